//! The daemon's API as a contract: its handlers over a fake cloudlet
//! (`fake`), the OpenAPI document kept in docs/ (`openapi`), and
//! schemathesis against a live daemon and a live registry (`schemathesis`),
//! every operation against tenants' credentials on real VMs (`tenants`).
//! One test binary (each one costs CI a link of the whole daemon).

mod common;
#[path = "api/fake.rs"]
mod fake;
#[path = "api/openapi.rs"]
mod openapi;
#[path = "api/schemathesis.rs"]
mod schemathesis;
#[path = "api/tenants.rs"]
mod tenants;
