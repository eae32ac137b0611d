//! Each fixture in tests/fixtures/cgroup/ (written by tests/fixtures/generate.py) parsed to
//! the container id, pod uid, QoS class and systemd unit it must give.

use std::path::PathBuf;

use agentd_attestor::workload::cgroup::{container_info, systemd_unit, QosClass};

const DOCKER: &str = "3f4a9c2e8b7d6a5f4e3d2c1b0a998877665544332211ffeeddccbbaa00991122";
const CONTAINERD: &str = "9d2b1e7c4a6f8e0d3c5b7a9f1e2d4c6b8a0f3e5d7c9b1a2f4e6d8c0b2a4f6e81";
const CRIO: &str = "b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2";
const PODMAN: &str = "6e8f0a2c4e6a8c0e2a4c6e8a0c2e4a6c8e0a2c4e6a8c0e2a4c6e8a0c2e4a6c8e";
const POD: &str = "2c9d4a4a-0d5d-4f5b-9f1e-3b5c1c6f7a10";
const POD_SLICE: &str = "2c9d4a4a_0d5d_4f5b_9f1e_3b5c1c6f7a10";

struct Expect {
    file: &'static str,
    container_id: Option<&'static str>,
    pod_uid: Option<&'static str>,
    qos: Option<QosClass>,
    /// (unit, manager)
    unit: Option<(String, &'static str)>,
}

#[rustfmt::skip]
fn table() -> Vec<Expect> {
    use QosClass::*;
    let sys = |u: String| Some((u, "system"));
    vec![
        Expect { file: "docker-cgroupv1.txt", container_id: Some(DOCKER), pod_uid: None, qos: None, unit: None },
        Expect { file: "docker-cgroupv2.txt", container_id: Some(DOCKER), pod_uid: None, qos: None, unit: sys(format!("docker-{DOCKER}.scope")) },
        Expect { file: "docker-cgroupfs-cgroupv2.txt", container_id: Some(DOCKER), pod_uid: None, qos: None, unit: None },
        Expect { file: "docker-in-docker-cgroupv2.txt", container_id: Some(DOCKER), pod_uid: None, qos: None, unit: sys(format!("docker-{DOCKER}.scope")) },
        Expect { file: "containerd-k8s-cgroupv1-burstable.txt", container_id: Some(CONTAINERD), pod_uid: Some(POD), qos: Some(Burstable), unit: None },
        Expect { file: "containerd-k8s-cgroupv1-guaranteed.txt", container_id: Some(CONTAINERD), pod_uid: Some(POD), qos: Some(Guaranteed), unit: None },
        Expect { file: "containerd-k8s-cgroupv2-guaranteed.txt", container_id: Some(CONTAINERD), pod_uid: Some(POD), qos: Some(Guaranteed), unit: sys(format!("cri-containerd-{CONTAINERD}.scope")) },
        Expect { file: "containerd-k8s-cgroupv2-besteffort.txt", container_id: Some(CONTAINERD), pod_uid: Some(POD), qos: Some(BestEffort), unit: sys(format!("cri-containerd-{CONTAINERD}.scope")) },
        Expect { file: "cri-o-k8s-cgroupv1-burstable.txt", container_id: Some(CRIO), pod_uid: Some(POD), qos: Some(Burstable), unit: sys(format!("crio-{CRIO}.scope")) },
        Expect { file: "cri-o-k8s-cgroupv2-besteffort.txt", container_id: Some(CRIO), pod_uid: Some(POD), qos: Some(BestEffort), unit: sys(format!("crio-{CRIO}.scope")) },
        Expect { file: "cri-o-conmon-cgroupv2.txt", container_id: None, pod_uid: None, qos: None, unit: sys(format!("crio-conmon-{CRIO}.scope")) },
        Expect { file: "podman-cgroupv1.txt", container_id: Some(PODMAN), pod_uid: None, qos: None, unit: sys(format!("libpod-{PODMAN}.scope")) },
        Expect { file: "podman-cgroupv2.txt", container_id: Some(PODMAN), pod_uid: None, qos: None, unit: sys(format!("libpod-{PODMAN}.scope")) },
        Expect { file: "podman-conmon-cgroupv2.txt", container_id: None, pod_uid: None, qos: None, unit: sys(format!("libpod-conmon-{PODMAN}.scope")) },
        // Rootless: the user names those cgroups; reported only when asked for (below).
        Expect { file: "podman-rootless-cgroupv2.txt", container_id: None, pod_uid: None, qos: None, unit: Some((format!("libpod-{PODMAN}.scope"), "user@1000.service")) },
        Expect { file: "systemd-service-cgroupv2.txt", container_id: None, pod_uid: None, qos: None, unit: sys("nginx.service".into()) },
        Expect { file: "systemd-service-cgroupv1.txt", container_id: None, pod_uid: None, qos: None, unit: sys("nginx.service".into()) },
        Expect { file: "systemd-user-service-cgroupv2.txt", container_id: None, pod_uid: None, qos: None, unit: Some(("agent.service".into(), "user@1000.service")) },
        Expect { file: "host-no-container.txt", container_id: None, pod_uid: None, qos: None, unit: sys("session-3.scope".into()) },
        Expect { file: "host-no-container-hybrid.txt", container_id: None, pod_uid: None, qos: None, unit: sys("session-3.scope".into()) },
    ]
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cgroup")
}

fn read(file: &str) -> String {
    std::fs::read_to_string(dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn each_fixture_parses_to_its_container_pod_qos_and_unit() {
    for e in table() {
        let text = read(e.file);
        let info = container_info(&text, false).unwrap_or_else(|d| panic!("{}: {d}", e.file));
        assert_eq!(
            info.container_id.as_deref(),
            e.container_id,
            "{}: container id",
            e.file
        );
        assert_eq!(info.pod_uid.as_deref(), e.pod_uid, "{}: pod uid", e.file);
        assert_eq!(info.qos, e.qos, "{}: qos", e.file);
        let unit = systemd_unit(&text).map(|u| (u.unit, u.manager));
        assert_eq!(
            unit,
            e.unit.map(|(u, m)| (u, m.to_string())),
            "{}: systemd unit",
            e.file
        );
    }
}

#[test]
fn every_fixture_is_in_the_table() {
    let mut files: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut named: Vec<String> = table().iter().map(|e| e.file.to_string()).collect();
    named.sort();
    assert_eq!(files, named);
}

#[test]
fn rootless_containers_when_asked_for() {
    let info = container_info(&read("podman-rootless-cgroupv2.txt"), true).unwrap();
    assert_eq!(info.container_id.as_deref(), Some(PODMAN));
}

#[test]
fn pod_uid_is_normalized_to_dashes() {
    assert!(read("containerd-k8s-cgroupv2-besteffort.txt").contains(POD_SLICE));
    let info = container_info(&read("containerd-k8s-cgroupv2-besteffort.txt"), false).unwrap();
    assert_eq!(info.pod_uid.as_deref(), Some(POD));
}

#[test]
fn cut_short_fixtures_never_panic() {
    for e in table() {
        let text = read(e.file);
        for end in 0..text.len() {
            if text.is_char_boundary(end) {
                let _ = container_info(&text[..end], false);
                let _ = systemd_unit(&text[..end]);
            }
        }
    }
}
