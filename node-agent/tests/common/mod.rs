//! Helpers shared by the node agent's integration tests.
pub mod fake_apiserver;
