//! ADD, DEL, CHECK, VERSION, STATUS and GC, and the failure policy.
//!
//! Failure policy (explicit, and every branch is logged):
//!
//! * Pods in `excludedNamespaces` (kube-system by default) never depend on the agent: ADD and
//!   CHECK succeed without asking it, so the cluster's own pods start even when the agent is
//!   down. DEL still tells the agent (best effort, like every DEL), in case the pod was
//!   enrolled before the namespace was excluded.
//! * ADD/CHECK for other pods: an unavailable agent (socket missing, connection refused,
//!   timeout, no or undecodable reply) is code 11 "try again later", so the runtime retries
//!   and the pod never runs uncaptured by accident — unless `failOpen: true`, in which case
//!   the command succeeds and a WARN line says the pod is NOT captured.
//! * An agent that answers with an error decides itself: `retry: true` → code 11; otherwise
//!   code 5 (the agent failed to program the node — an I/O failure in the spec's terms; the
//!   reply carries no structured kind, so a config problem on the agent's side cannot be told
//!   apart and is reported as 5 too). `failOpen` does not override an answer from the agent.
//! * DEL always succeeds once env and config are valid: a DEL that fails blocks pod teardown
//!   forever, and the agent reconciles (and GC collects) whatever a missed DEL leaves behind.
//! * STATUS: agent unavailable or not ready → code 50. With `failOpen`, an unavailable agent
//!   does not make STATUS fail, since ADD would succeed.
//! * GC: an unavailable agent is code 11; without any attachment list (cnitool sends none)
//!   nothing is valid, as libcni means it, and that is logged as a WARN.

use ambient_net::proto::{PodInfo, Reply, Request};
use tracing::{debug, error, info, warn};

use crate::client::{AgentClient, ClientError};
use crate::config::{self, NetConf};
use crate::env::{CniEnv, Command, EnvMap, CNI_COMMAND, CNI_CONTAINERID};
use crate::error::CniError;
use crate::prev_result::{self, PrevResult};
use crate::version::{self, CniVersion};

/// What the plugin prints on stdout and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub exit_code: i32,
}

impl Output {
    fn success(stdout: Option<String>) -> Self {
        Output {
            stdout: stdout.map(|s| s + "\n").unwrap_or_default(),
            exit_code: 0,
        }
    }

    /// The error JSON, in `version` (the request's, when known) or the latest.
    pub fn error(e: &CniError, version: Option<CniVersion>) -> Self {
        let v = version.unwrap_or(CniVersion::LATEST);
        Output {
            stdout: e.to_json(v.as_str()) + "\n",
            exit_code: 1,
        }
    }
}

/// Runs one CNI invocation: `env` is the process environment, `stdin` the network config.
/// Logs go to whatever tracing subscriber is active; nothing here writes to stdout.
pub fn execute(env: &EnvMap, stdin: &[u8]) -> Output {
    match dispatch(env, stdin) {
        Ok(out) => Output::success(out),
        Err(e) => Output::error(&e, config::peek_version(stdin)),
    }
}

fn dispatch(env_map: &EnvMap, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let env = CniEnv::from_map(env_map).inspect_err(|e| {
        // No valid env, so no span: name what we were given.
        let raw = |k: &str| env_map.get(k).map(String::as_str).unwrap_or("").to_string();
        error!(
            command = raw(CNI_COMMAND),
            container = raw(CNI_CONTAINERID),
            code = e.code(),
            details = e.details(),
            "failed: {}",
            e.msg()
        );
    })?;
    if env.command == Command::Version {
        // The runtime probes with whatever version it speaks; always answer, in its version
        // when we know it, else in ours (an unknown version must not break negotiation).
        return Ok(Some(version::version_info(config::peek_version(stdin))));
    }
    let span = tracing::info_span!(
        "cni",
        pid = std::process::id(),
        cmd = %env.command,
        container = env.container_id(),
        ifname = env.if_name(),
        pod = %format_args!("{}/{}", env.pod_namespace(), env.pod_name()),
        network = tracing::field::Empty,
        version = tracing::field::Empty,
    );
    let _entered = span.enter();
    let result = NetConf::parse(stdin).and_then(|conf| {
        span.record("network", conf.name.as_str());
        span.record("version", conf.cni_version.as_str());
        debug!(netns = env.netns(), socket = %conf.options.agent_socket.display(), "invoked");
        let agent = AgentClient::new(&conf.options.agent_socket, conf.options.timeout);
        match env.command {
            Command::Add => cmd_add(&env, &conf, &agent),
            Command::Del => cmd_del(&env, &agent),
            Command::Check => cmd_check(&env, &conf, &agent),
            Command::Status => cmd_status(&conf, &agent),
            Command::Gc => cmd_gc(&conf, &agent),
            // Answered above; kept total without a panic.
            Command::Version => Ok(Some(version::version_info(Some(conf.cni_version)))),
        }
    });
    if let Err(e) = &result {
        error!(
            code = e.code(),
            details = e.details(),
            "failed: {}",
            e.msg()
        );
    }
    result
}

fn cmd_add(env: &CniEnv, conf: &NetConf, agent: &AgentClient) -> Result<Option<String>, CniError> {
    let prev = require_prev_result(conf)?;
    let decoded = PrevResult::decode(prev)?;
    let output = prev_result::to_output(prev, conf.cni_version)?;
    let namespace = env.pod_namespace();
    if conf.options.is_excluded(namespace) {
        info!(
            verdict = "not enrolled",
            reason = "namespace excluded in the plugin config; agent not asked",
            "ADD done"
        );
        return Ok(Some(output));
    }
    let pod = PodInfo {
        container_id: env.container_id().to_string(),
        if_name: env.if_name().to_string(),
        netns: env.netns().to_string(),
        namespace: namespace.to_string(),
        name: env.pod_name().to_string(),
        uid: env.args.pod_uid.clone().unwrap_or_default(),
        ips: decoded.addresses(),
        gateways: decoded.gateways(),
    };
    let ips = format!("{:?}", pod.ips);
    match agent.call(&Request::Add { pod }) {
        Ok(Reply::Ok { enrolled, reason }) => {
            info!(
                verdict = if enrolled { "enrolled" } else { "not enrolled" },
                reason = %reason,
                ips = %ips,
                "ADD done"
            );
            Ok(Some(output))
        }
        Ok(Reply::Error { message, retry }) => Err(agent_error("ADD", message, retry)),
        Err(e) => unavailable_pod_command("ADD", conf, agent, e).map(|()| Some(output)),
    }
}

fn cmd_del(env: &CniEnv, agent: &AgentClient) -> Result<Option<String>, CniError> {
    // prevResult is deliberately not read: DEL must work whatever is left of the pod.
    let req = Request::Del {
        container_id: env.container_id().to_string(),
        if_name: env.if_name().to_string(),
    };
    match agent.call(&req) {
        Ok(Reply::Ok { reason, .. }) => info!(reason = %reason, "DEL done"),
        Ok(Reply::Error { message, retry }) => warn!(
            agent_error = %message,
            retry,
            "agent failed DEL; succeeding anyway so teardown is never blocked (the agent reconciles)"
        ),
        Err(e) => warn!(
            socket = %agent.socket().display(),
            error = %e,
            "agent unavailable on DEL; succeeding anyway so teardown is never blocked (the agent reconciles, GC collects)"
        ),
    }
    Ok(None)
}

fn cmd_check(
    env: &CniEnv,
    conf: &NetConf,
    agent: &AgentClient,
) -> Result<Option<String>, CniError> {
    if !conf.cni_version.has_check() {
        return Err(CniError::incompatible_version(format!(
            "CHECK is not defined for cniVersion {}",
            conf.cni_version
        ))
        .with_details("CHECK needs cniVersion 0.4.0 or later"));
    }
    let prev = require_prev_result(conf)?;
    PrevResult::decode(prev)?;
    if conf.options.is_excluded(env.pod_namespace()) {
        info!("CHECK done: namespace excluded in the plugin config; agent not asked");
        return Ok(None);
    }
    let req = Request::Check {
        container_id: env.container_id().to_string(),
        if_name: env.if_name().to_string(),
    };
    match agent.call(&req) {
        Ok(Reply::Ok { enrolled, reason }) => {
            info!(enrolled, reason = %reason, "CHECK done");
            Ok(None)
        }
        Ok(Reply::Error { message, retry }) => Err(agent_error("CHECK", message, retry)),
        Err(e) => unavailable_pod_command("CHECK", conf, agent, e).map(|()| None),
    }
}

fn cmd_status(conf: &NetConf, agent: &AgentClient) -> Result<Option<String>, CniError> {
    require_1_1("STATUS", conf)?;
    match agent.call(&Request::Status) {
        Ok(Reply::Ok { reason, .. }) => {
            info!(reason = %reason, "STATUS: agent ready");
            Ok(None)
        }
        Ok(Reply::Error { message, .. }) => {
            Err(CniError::not_available("ambient agent is not ready").with_details(message))
        }
        Err(e) if conf.options.fail_open => {
            warn!(
                socket = %agent.socket().display(),
                error = %e,
                "STATUS: agent unavailable but failOpen is set: reporting available; new pods will NOT be captured"
            );
            Ok(None)
        }
        Err(e) => Err(CniError::not_available("ambient agent is unavailable")
            .with_details(unavailable_details(agent, &e))),
    }
}

fn cmd_gc(conf: &NetConf, agent: &AgentClient) -> Result<Option<String>, CniError> {
    require_1_1("GC", conf)?;
    let valid = match conf.valid_attachments()? {
        Some(v) => v,
        None => {
            warn!(
                "GC without {} or {}: no attachment is valid, every enrolled pod will be dropped",
                config::VALID_ATTACHMENTS_KEY,
                config::ATTACHMENTS_KEY
            );
            Vec::new()
        }
    };
    let count = valid.len();
    match agent.call(&Request::Gc { valid }) {
        Ok(Reply::Ok { reason, .. }) => {
            info!(valid = count, reason = %reason, "GC done");
            Ok(None)
        }
        Ok(Reply::Error { message, retry }) => Err(agent_error("GC", message, retry)),
        Err(e) => Err(CniError::try_again_later("ambient agent is unavailable")
            .with_details(unavailable_details(agent, &e))),
    }
}

fn require_prev_result(conf: &NetConf) -> Result<&serde_json::Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("ambient-cni must be chained after a primary plugin")
            .with_details("the network configuration has no prevResult")
    })
}

fn require_1_1(what: &str, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version.has_status_and_gc() {
        Ok(())
    } else {
        Err(CniError::incompatible_version(format!(
            "{what} is not defined for cniVersion {}",
            conf.cni_version
        ))
        .with_details(format!("{what} needs cniVersion 1.1.0")))
    }
}

/// An error the agent itself reported (see the module docs for the code choice).
fn agent_error(what: &str, message: String, retry: bool) -> CniError {
    if retry {
        CniError::try_again_later(format!("ambient agent cannot complete {what} yet"))
            .with_details(message)
    } else {
        CniError::io(format!("ambient agent failed {what}")).with_details(message)
    }
}

/// ADD/CHECK could not reach the agent: fail with 11, or succeed loudly under failOpen.
fn unavailable_pod_command(
    what: &str,
    conf: &NetConf,
    agent: &AgentClient,
    e: ClientError,
) -> Result<(), CniError> {
    if conf.options.fail_open {
        warn!(
            socket = %agent.socket().display(),
            error = %e,
            verdict = "not enrolled",
            "{what}: agent unavailable and failOpen is set: succeeding, the pod is NOT captured by the ambient mesh"
        );
        Ok(())
    } else {
        Err(CniError::try_again_later("ambient agent is unavailable")
            .with_details(unavailable_details(agent, &e)))
    }
}

fn unavailable_details(agent: &AgentClient, e: &ClientError) -> String {
    match e {
        // Already names the socket.
        ClientError::Connect { .. } => e.to_string(),
        _ => format!("{e} (socket {})", agent.socket().display()),
    }
}

#[cfg(test)]
mod tests;
