//! Tenants: who calls ([`Caller`], from the credential it showed), which
//! VMs it sees ([`Caller::sees`]), and what a tenant's VMs may hold
//! together on this cloudlet ([`quota_left`], checked in
//! `Cloudlet::reserve` atomically with the capacity, for a synthesis and
//! for a VM arriving by handoff alike).
//!
//! A VM belongs to the tenant whose credential created it (recorded in
//! `VmRecord::tenant`, carried by every handoff); one created with an
//! operator's token belongs to none. A tenant sees only its own VMs:
//! another tenant's VM is not found (404, never 403: its existence is not
//! told). The operator sees every VM and alone may change the cloudlet
//! (base VMs, maintenance) and take handoffs from peers.

use cloudlet_api::Resources;

use crate::config::Quota;
use crate::core::store::VmRecord;

/// Who makes a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An operator's token (`tokens`): every VM, every call.
    Operator,
    /// A tenant's token (`[[tenants]]`): its own VMs.
    Tenant(String),
    /// A VM's session credential: that VM alone (its id, found from the id
    /// or name the path gave), to read, move or delete it.
    Session(String),
}

impl Caller {
    /// May this caller see the VM of `rec`?
    pub fn sees(&self, rec: &VmRecord) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Tenant(t) => rec.tenant.as_deref() == Some(t.as_str()),
            Caller::Session(vm) => rec.id == *vm,
        }
    }

    /// The tenant a VM this caller creates belongs to.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Tenant(t) => Some(t),
            _ => None,
        }
    }

    pub fn is_operator(&self) -> bool {
        *self == Caller::Operator
    }

    /// For the log line of each call ("by=...").
    pub fn describe(&self) -> String {
        match self {
            Caller::Operator => "operator".into(),
            Caller::Tenant(t) => format!("tenant {t}"),
            Caller::Session(vm) => format!("session of VM {vm}"),
        }
    }
}

/// Why a VM of `asked` does not fit `quota` beside what the tenant's VMs
/// hold already (`used`): `None` when it fits.
pub fn quota_left(quota: &Quota, used: Resources, asked: Resources) -> Option<String> {
    if let Some(max) = quota.vms.filter(|m| used.vms + asked.vms > *m) {
        return Some(format!("{} of {max} VMs in use", used.vms));
    }
    if let Some(max) = quota.vcpus.filter(|m| used.vcpus + asked.vcpus > *m) {
        return Some(format!(
            "{} of {max} vCPUs in use, {} more asked",
            used.vcpus, asked.vcpus
        ));
    }
    if let Some(max) = quota
        .memory_mib
        .filter(|m| used.memory_mib + asked.memory_mib > *m)
    {
        return Some(format!(
            "{} of {max} MiB in use, {} more asked",
            used.memory_mib, asked.memory_mib
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(vms: u32, vcpus: u32, memory_mib: u64) -> Resources {
        Resources {
            vms,
            vcpus,
            memory_mib,
        }
    }

    #[test]
    fn quotas_count_what_is_held_and_what_is_asked() {
        let q = Quota {
            vms: Some(2),
            vcpus: Some(3),
            memory_mib: Some(1024),
        };
        assert_eq!(quota_left(&q, r(1, 1, 512), r(1, 1, 512)), None);
        assert!(quota_left(&q, r(2, 2, 512), r(1, 1, 256))
            .unwrap()
            .contains("2 of 2 VMs"));
        assert!(quota_left(&q, r(1, 2, 256), r(1, 2, 256))
            .unwrap()
            .contains("vCPUs"));
        assert!(quota_left(&q, r(1, 1, 768), r(1, 1, 512))
            .unwrap()
            .contains("768 of 1024 MiB"));
        assert_eq!(
            quota_left(&Quota::default(), r(99, 99, 1 << 30), r(1, 8, 1 << 20)),
            None,
            "no quota: only the capacity limits"
        );
    }

    #[test]
    fn a_tenant_sees_its_own_vms_only() {
        let flavor = cloudlet_api::Flavor {
            name: "small".into(),
            vcpus: 1,
            memory_mib: 512,
        };
        let mut rec = VmRecord::new(crate::core::store::NewVmRecord {
            id: "v1".into(),
            name: "app".into(),
            state: cloudlet_api::VmState::Running,
            generation: 1,
            base_id: "b".into(),
            overlay: "o".into(),
            flavor: &flavor,
            dir: "/x".into(),
            app: Default::default(),
        });
        let acme = Caller::Tenant("acme".into());
        assert!(!acme.sees(&rec), "the operator's VM");
        assert!(Caller::Operator.sees(&rec));
        rec.tenant = Some("acme".into());
        assert!(acme.sees(&rec));
        assert!(!Caller::Tenant("other".into()).sees(&rec));
        assert!(
            !Caller::Session("app".into()).sees(&rec),
            "a session is its VM's id (a name may be another tenant's too)"
        );
        assert!(Caller::Session("v1".into()).sees(&rec));
        assert!(!Caller::Session("v2".into()).sees(&rec));
    }
}
