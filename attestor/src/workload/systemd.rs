//! The `systemd` workload attestor: `systemd:id:<unit>` (the innermost unit:
//! `foo.service`, `session-3.scope`, or for a user unit `x.service` under
//! `user@1000.service`) and `systemd:manager:system` or `systemd:manager:user@<uid>.service`
//! (which service manager runs that unit: a user can name their own units as they like), from
//! /proc/<pid>/cgroup.

use super::cgroup::systemd_unit;
use super::process::ProcessSnapshot;
use super::{AttestError, PeerCredentials, WorkloadAttestor};
use crate::Selector;

#[derive(Debug, Clone, Default)]
pub struct SystemdAttestor;

impl WorkloadAttestor for SystemdAttestor {
    fn kind(&self) -> &'static str {
        "systemd"
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
                tracing::warn!(pid = process.pid(), reason, "no systemd selectors");
                return Ok(Vec::new());
            }
        };
        let Some(unit) = systemd_unit(text) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(2);
        out.extend(Selector::new("systemd", format!("id:{}", unit.unit)));
        out.extend(Selector::new(
            "systemd",
            format!("manager:{}", unit.manager),
        ));
        Ok(out)
    }
}
