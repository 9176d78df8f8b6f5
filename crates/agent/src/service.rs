//! The `hyperstart.v1.Agent` ttrpc service. Handlers convert requests into typed calls and
//! return [`AgentError`]; the conversion to a ttrpc status happens once, via `?` into
//! `ttrpc::Error` (see [`crate::error`]).

use std::sync::Arc;
use std::time::Duration;

use protocol::agent::{self as pb};
use protocol::agent_ttrpc::{create_agent, Agent};
use protocol::{MAX_PING_COUNT, MAX_PING_TIMEOUT_MS, PROTOCOL_VERSION};
use ttrpc::TtrpcContext;

use crate::block::{selector_from_proto, BlockDevices};
use crate::error::AgentError;
use crate::net::{self, iface, route};
use crate::power::{self, PowerAction, PowerMode};
use crate::runtime::{ContainerError, Containers};

/// What the service may do, decided at start-up.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// `hyperstart.debug=1`: DebugPanic is allowed.
    pub debug: bool,
    /// Where block devices live.
    pub block: BlockDevices,
    /// Guest (real reboot) or host process (exit instead).
    pub power: PowerMode,
}

/// The agent service.
#[derive(Debug, Clone)]
pub struct AgentService {
    config: ServiceConfig,
    /// The container runtime; `None` answers container RPCs with UNIMPLEMENTED.
    containers: Option<Arc<Containers>>,
}

impl AgentService {
    pub fn new(config: ServiceConfig) -> Self {
        AgentService {
            config,
            containers: None,
        }
    }

    /// Serves container RPCs with `containers`.
    pub fn with_containers(mut self, containers: Arc<Containers>) -> Self {
        self.containers = Some(containers);
        self
    }

    /// The ttrpc method table for [`ttrpc::Server::register_service`].
    pub fn into_methods(
        self,
    ) -> std::collections::HashMap<String, Box<dyn ttrpc::MethodHandler + Send + Sync>> {
        create_agent(Arc::new(self))
    }

    fn interface_config(
        req: &pb::UpdateInterfaceRequest,
    ) -> Result<iface::InterfaceConfig, AgentError> {
        iface::validate_name(&req.name)?;
        let mac = match req.mac.as_str() {
            "" => None,
            mac => Some(iface::parse_mac(mac)?),
        };
        let ipv4 = match req.ipv4.as_ref() {
            None => None,
            Some(a) => {
                let addr = net::parse_ipv4(&a.address)?;
                net::prefix_to_mask(a.prefix_len)?;
                Some((addr, a.prefix_len))
            }
        };
        let mtu = match req.mtu {
            0 => None,
            mtu => Some(iface::validate_mtu(mtu)?),
        };
        Ok(iface::InterfaceConfig {
            name: req.name.clone(),
            mac,
            ipv4,
            mtu,
            up: req.up,
        })
    }

    fn schedule_reboot(&self, rpc: &str) {
        log::info!("{rpc} requested");
        power::schedule(self.config.power, PowerAction::Reboot, power::REPLY_GRACE);
    }
}

impl Agent for AgentService {
    fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::VersionRequest,
    ) -> ttrpc::Result<pb::VersionResponse> {
        let mut resp = pb::VersionResponse::new();
        resp.agent_version = crate::AGENT_VERSION.to_owned();
        resp.protocol_version = PROTOCOL_VERSION;
        Ok(resp)
    }

    fn ping(&self, _ctx: &TtrpcContext, req: pb::PingRequest) -> ttrpc::Result<pb::PingResponse> {
        let mut resp = pb::PingResponse::new();
        resp.nonce = req.nonce;
        Ok(resp)
    }

    fn read_block(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadBlockRequest,
    ) -> ttrpc::Result<pb::ReadBlockResponse> {
        let selector = selector_from_proto(req.device.as_ref()).map_err(AgentError::from)?;
        let read = self
            .config
            .block
            .read(&selector, req.offset, req.length)
            .map_err(AgentError::from)?;
        let mut resp = pb::ReadBlockResponse::new();
        resp.data = read.data;
        resp.size_bytes = read.size_bytes;
        resp.path = read.path;
        Ok(resp)
    }

    fn block_size(
        &self,
        _ctx: &TtrpcContext,
        req: pb::BlockSizeRequest,
    ) -> ttrpc::Result<pb::BlockSizeResponse> {
        let selector = selector_from_proto(req.device.as_ref()).map_err(AgentError::from)?;
        let (path, size) = self
            .config
            .block
            .size(&selector)
            .map_err(AgentError::from)?;
        let mut resp = pb::BlockSizeResponse::new();
        resp.size_bytes = size;
        resp.path = path;
        Ok(resp)
    }

    fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateInterfaceRequest,
    ) -> ttrpc::Result<pb::UpdateInterfaceResponse> {
        let config = Self::interface_config(&req)?;
        iface::configure(&config).map_err(AgentError::from)?;
        log::info!("configured interface {}", config.name);
        Ok(pb::UpdateInterfaceResponse::new())
    }

    fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateRoutesRequest,
    ) -> ttrpc::Result<pb::UpdateRoutesResponse> {
        // Validate everything before touching the routing table.
        let routes = req
            .routes
            .iter()
            .map(|r| route::Route::parse(&r.destination, &r.gateway, &r.device))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::from)?;
        for r in &routes {
            route::replace(r).map_err(AgentError::from)?;
        }
        Ok(pb::UpdateRoutesResponse::new())
    }

    fn ping_host(
        &self,
        _ctx: &TtrpcContext,
        req: pb::PingHostRequest,
    ) -> ttrpc::Result<pb::PingHostResponse> {
        let dest = net::parse_ipv4(&req.address).map_err(AgentError::from)?;
        if !(1..=MAX_PING_COUNT).contains(&req.count) {
            return Err(AgentError::InvalidArgument(format!(
                "count must be in 1..={MAX_PING_COUNT}"
            ))
            .into());
        }
        if !(1..=MAX_PING_TIMEOUT_MS).contains(&req.timeout_ms) {
            return Err(AgentError::InvalidArgument(format!(
                "timeout_ms must be in 1..={MAX_PING_TIMEOUT_MS}"
            ))
            .into());
        }
        let report = net::ping::ping(
            dest,
            req.count,
            Duration::from_millis(u64::from(req.timeout_ms)),
        )
        .map_err(AgentError::from)?;
        let mut resp = pb::PingHostResponse::new();
        resp.transmitted = report.transmitted;
        resp.received = report.received;
        resp.rtt_us = report.rtt_us;
        Ok(resp)
    }

    fn reboot(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::RebootRequest,
    ) -> ttrpc::Result<pb::RebootResponse> {
        self.schedule_reboot("Reboot");
        Ok(pb::RebootResponse::new())
    }

    fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::ShutdownRequest,
    ) -> ttrpc::Result<pb::ShutdownResponse> {
        self.schedule_reboot("Shutdown");
        Ok(pb::ShutdownResponse::new())
    }

    fn debug_panic(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::DebugPanicRequest,
    ) -> ttrpc::Result<pb::DebugPanicResponse> {
        if !self.config.debug {
            return Err(AgentError::PermissionDenied(
                "DebugPanic needs hyperstart.debug=1 on the kernel command line".to_owned(),
            )
            .into());
        }
        power::schedule(self.config.power, PowerAction::ExitInit, power::REPLY_GRACE);
        Ok(pb::DebugPanicResponse::new())
    }

    fn guest_info(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::GuestInfoRequest,
    ) -> ttrpc::Result<pb::GuestInfoResponse> {
        let info = crate::sysinfo::read().map_err(AgentError::from)?;
        let mut resp = pb::GuestInfoResponse::new();
        resp.online_cpus = info.online_cpus;
        resp.mem_total_bytes = info.mem_total_bytes;
        resp.kernel_release = info.kernel_release;
        resp.uptime_ms = info.uptime_ms;
        Ok(resp)
    }

    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::CreateContainerResponse> {
        Ok(containers::create(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> ttrpc::Result<pb::StartContainerResponse> {
        Ok(containers::start(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn wait_process(
        &self,
        ctx: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        Ok(containers::wait(self.containers()?, ctx.timeout_nano, &req)
            .map_err(AgentError::from)?)
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<pb::SignalProcessResponse> {
        Ok(containers::signal(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> ttrpc::Result<pb::RemoveContainerResponse> {
        Ok(containers::remove(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn read_stream(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        Ok(containers::read_stream(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WriteStdinRequest,
    ) -> ttrpc::Result<pb::WriteStdinResponse> {
        Ok(containers::write_stdin(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> ttrpc::Result<pb::CloseStdinResponse> {
        Ok(containers::close_stdin(self.containers()?, &req).map_err(AgentError::from)?)
    }
    fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CreateSandboxRequest,
    ) -> ttrpc::Result<pb::CreateSandboxResponse> {
        Ok(containers::create_sandbox(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::DestroySandboxRequest,
    ) -> ttrpc::Result<pb::DestroySandboxResponse> {
        Ok(containers::destroy_sandbox(self.containers()?).map_err(AgentError::from)?)
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::ExecProcessResponse> {
        Ok(containers::exec(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn resize_tty(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResizeTtyRequest,
    ) -> ttrpc::Result<pb::ResizeTtyResponse> {
        Ok(containers::resize_tty(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StatsContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        Ok(containers::stats(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<pb::UpdateContainerResponse> {
        Ok(containers::update(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::PauseContainerRequest,
    ) -> ttrpc::Result<pb::PauseContainerResponse> {
        containers::set_paused(self.containers()?, &req.container_id, true)
            .map_err(AgentError::from)?;
        Ok(pb::PauseContainerResponse::new())
    }

    fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ResumeContainerRequest,
    ) -> ttrpc::Result<pb::ResumeContainerResponse> {
        containers::set_paused(self.containers()?, &req.container_id, false)
            .map_err(AgentError::from)?;
        Ok(pb::ResumeContainerResponse::new())
    }

    fn copy_file(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CopyFileRequest,
    ) -> ttrpc::Result<pb::CopyFileResponse> {
        Ok(containers::copy_file(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> ttrpc::Result<pb::ListProcessesResponse> {
        Ok(containers::list_processes(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn get_events(
        &self,
        _ctx: &TtrpcContext,
        req: pb::GetEventsRequest,
    ) -> ttrpc::Result<pb::GetEventsResponse> {
        Ok(containers::get_events(self.containers()?, &req).map_err(AgentError::from)?)
    }

    fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveProcessRequest,
    ) -> ttrpc::Result<pb::RemoveProcessResponse> {
        self.containers()?
            .remove_exec(&req.container_id, &req.exec_id)
            .map_err(AgentError::from)?;
        Ok(pb::RemoveProcessResponse::new())
    }

    fn health(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::HealthRequest,
    ) -> ttrpc::Result<pb::HealthResponse> {
        let mut resp = pb::HealthResponse::new();
        resp.status = "SERVING".to_owned();
        if let Some(c) = &self.containers {
            resp.containers = u32::try_from(c.len()).unwrap_or(u32::MAX);
            resp.sandbox = c.has_sandbox();
        }
        Ok(resp)
    }
}

impl AgentService {
    fn containers(&self) -> Result<&Containers, AgentError> {
        self.containers.as_deref().ok_or_else(|| {
            ContainerError::Unimplemented("this agent runs without a container runtime").into()
        })
    }
}

mod containers;

#[cfg(test)]
mod tests;
