//! The `container` workload attestor: `container:id:<64 hex>` for a process in a docker,
//! containerd/CRI, CRI-O or podman container, and `k8s:pod-uid:<uid>` and
//! `k8s:qos:guaranteed|burstable|besteffort` for a process in a Kubernetes pod, all from
//! /proc/<pid>/cgroup (see [`super::cgroup`] for the formats and what cannot be forged).
//! A process in no container gets no selector.

use super::cgroup::container_info;
use super::process::ProcessSnapshot;
use super::{AttestError, PeerCredentials, WorkloadAttestor};
use crate::Selector;

#[derive(Debug, Clone, Default)]
pub struct ContainerAttestor {
    user_trees: bool,
}

impl ContainerAttestor {
    /// Also report containers found in a user's delegated cgroup tree
    /// (`user@<uid>.service/...`, where rootless podman and docker put theirs). The user
    /// chooses those cgroup names, so such ids must be combined with `unix:uid` in entries.
    pub fn with_user_trees(mut self, on: bool) -> Self {
        self.user_trees = on;
        self
    }
}

impl WorkloadAttestor for ContainerAttestor {
    fn kind(&self) -> &'static str {
        "container"
    }

    fn attest_process(
        &self,
        _peer: &PeerCredentials,
        process: Option<&ProcessSnapshot>,
    ) -> Result<Vec<Selector>, AttestError> {
        let Some(process) = process else {
            return Ok(Vec::new());
        };
        let text = match process.cgroup() {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(pid = process.pid(), reason, "no container selectors");
                return Ok(Vec::new());
            }
        };
        let info = match container_info(text, self.user_trees) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(pid = process.pid(), reason = %e, "no container selectors");
                return Ok(Vec::new());
            }
        };
        let mut out = Vec::with_capacity(3);
        if let Some(id) = info.container_id {
            out.extend(Selector::new("container", format!("id:{id}")));
        }
        if let Some(uid) = info.pod_uid {
            out.extend(Selector::new("k8s", format!("pod-uid:{uid}")));
        }
        if let Some(qos) = info.qos {
            out.extend(Selector::new("k8s", format!("qos:{}", qos.as_str())));
        }
        Ok(out)
    }
}
