//! Read-only commands: `pods`, `ps`, `logs`, `exec`, `info`.

use std::collections::HashMap;
use std::io::{self, Write};

use anyhow::Context as _;
use ctl::client::Search;
use ctl::logs;
use ctl::resolve::{bare_id, short_id};
use ctl::{cri, Cri};

use super::{container_state, exit_code, pod_state, print_json, Ctx};
use crate::table::{ago, Table};
use crate::{ExecArgs, InfoArgs, LogsArgs, Output, PodState, PodsArgs, PsArgs};

pub async fn pods(ctx: &Ctx, a: PodsArgs) -> anyhow::Result<u8> {
    let filter = a.state.map(|s| cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue {
            state: match s {
                PodState::Ready => cri::PodSandboxState::SandboxReady,
                PodState::Notready => cri::PodSandboxState::SandboxNotready,
            } as i32,
        }),
        ..Default::default()
    });
    let mut items = ctx.cri.list_pod_sandbox(filter).await?;
    if let Some(name) = &a.name {
        items.retain(|p| p.metadata.as_ref().is_some_and(|m| &m.name == name));
    }
    items.sort_by_key(|p| std::cmp::Reverse(p.created_at));
    if ctx.output == Output::Json {
        print_json(&cri::ListPodSandboxResponse { items })?;
        return Ok(0);
    }
    let mut out = io::stdout().lock();
    if a.quiet {
        for p in &items {
            writeln!(out, "{}", p.id)?;
        }
        return Ok(0);
    }
    let mut t = Table::new(&[
        "POD ID",
        "CREATED",
        "STATE",
        "NAME",
        "NAMESPACE",
        "ATTEMPT",
        "RUNTIME",
    ]);
    for p in &items {
        let m = p.metadata.clone().unwrap_or_default();
        t.row(vec![
            short_id(&p.id).to_string(),
            ago(p.created_at),
            pod_state(p.state).to_string(),
            m.name,
            m.namespace,
            m.attempt.to_string(),
            if p.runtime_handler.is_empty() {
                "(default)".to_string()
            } else {
                p.runtime_handler.clone()
            },
        ]);
    }
    t.write(&mut out)?;
    Ok(0)
}

pub async fn ps(ctx: &Ctx, a: PsArgs) -> anyhow::Result<u8> {
    let mut filter = cri::ContainerFilter::default();
    if !a.all {
        filter.state = Some(cri::ContainerStateValue {
            state: cri::ContainerState::ContainerRunning as i32,
        });
    }
    if let Some(pod) = &a.pod {
        filter.pod_sandbox_id = ctx.cri.resolve(pod, Search::Pods).await?.id;
    }
    let mut containers = ctx.cri.list_containers(Some(filter)).await?;
    containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
    if ctx.output == Output::Json {
        print_json(&cri::ListContainersResponse { containers })?;
        return Ok(0);
    }
    let mut out = io::stdout().lock();
    if a.quiet {
        for c in &containers {
            writeln!(out, "{}", c.id)?;
        }
        return Ok(0);
    }
    // Image names for the ids runtimes put in Container.image (best effort: a listing must not fail on it).
    let names = image_names(&ctx.cri).await;
    let mut t = Table::new(&[
        "CONTAINER",
        "IMAGE",
        "CREATED",
        "STATE",
        "NAME",
        "ATTEMPT",
        "POD ID",
    ]);
    for c in &containers {
        let m = c.metadata.clone().unwrap_or_default();
        t.row(vec![
            short_id(&c.id).to_string(),
            image_column(c, &names),
            ago(c.created_at),
            container_state(c.state).to_string(),
            m.name,
            m.attempt.to_string(),
            short_id(&c.pod_sandbox_id).to_string(),
        ]);
    }
    t.write(&mut out)?;
    Ok(0)
}

async fn image_names(cri: &Cri) -> HashMap<String, String> {
    let images = cri.list_images().await.unwrap_or_default();
    images
        .into_iter()
        .filter_map(|i| {
            let name = i.repo_tags.first().or(i.repo_digests.first())?.clone();
            Some((bare_id(&i.id).to_string(), name))
        })
        .collect()
}

fn image_column(c: &cri::Container, names: &HashMap<String, String>) -> String {
    let spec = c.image.clone().unwrap_or_default();
    for candidate in [&spec.image, &c.image_ref, &c.image_id] {
        if let Some(n) = names.get(bare_id(candidate)) {
            return n.clone();
        }
    }
    if !spec.user_specified_image.is_empty() {
        return spec.user_specified_image;
    }
    if spec.image.starts_with("sha256:") {
        return short_id(&spec.image).to_string();
    }
    spec.image
}

pub async fn logs(ctx: &Ctx, a: LogsArgs) -> anyhow::Result<u8> {
    let id = ctx.cri.resolve(&a.container, Search::Containers).await?.id;
    let status = ctx.cri.container_status(&id).await?;
    let Some(path) = logs::log_path(&status) else {
        anyhow::bail!("container {} has no log file", short_id(&id));
    };
    let timestamps = a.timestamps;
    let end = logs::stream(&ctx.cri, &id, &path, a.follow, |r| {
        if timestamps {
            let mut stamped = ctl::logfmt::Record {
                message: format!("{} ", r.timestamp).into_bytes(),
                ..r.clone()
            };
            stamped.message.extend_from_slice(&r.message);
            super::run::print_record(&stamped)
        } else {
            super::run::print_record(r)
        }
    })
    .await
    .with_context(|| format!("cannot read the log of container {}", short_id(&id)))?;
    if let logs::LogEnd::Gone = end {
        eprintln!("hyperctl: container {} was removed", short_id(&id));
    }
    Ok(0)
}

pub async fn exec(ctx: &Ctx, a: ExecArgs) -> anyhow::Result<u8> {
    let id = ctx.cri.resolve(&a.container, Search::Containers).await?.id;
    let r = ctx.cri.exec_sync(&id, a.command, a.timeout).await?;
    {
        let mut out = io::stdout().lock();
        out.write_all(&r.stdout)?;
        out.flush()?;
    }
    io::stderr().lock().write_all(&r.stderr)?;
    Ok(exit_code(r.exit_code))
}

#[derive(serde::Serialize)]
struct Info {
    endpoint: String,
    version: cri::VersionResponse,
    status: cri::StatusResponse,
}

pub async fn info(ctx: &Ctx, a: InfoArgs) -> anyhow::Result<u8> {
    let (version, status) = tokio::try_join!(ctx.cri.version(), ctx.cri.status(a.verbose))?;
    let info = Info {
        endpoint: ctx.cri.endpoint().to_string(),
        version,
        status,
    };
    if ctx.output == Output::Json {
        print_json(&info)?;
        return Ok(0);
    }
    let mut out = io::stdout().lock();
    let v = &info.version;
    writeln!(out, "Endpoint:      {}", info.endpoint)?;
    writeln!(
        out,
        "Runtime:       {} {}",
        v.runtime_name, v.runtime_version
    )?;
    writeln!(out, "CRI API:       {}", v.runtime_api_version)?;
    let conditions = info
        .status
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    for (i, c) in conditions.iter().enumerate() {
        let mut line = format!("{}={}", c.r#type, c.status);
        let explained = !c.reason.is_empty() || !c.message.is_empty();
        if !c.status && explained {
            line.push_str(&format!(" ({}: {})", c.reason, c.message));
        }
        let head = if i == 0 { "Conditions:" } else { "" };
        writeln!(out, "{head:<15}{line}")?;
    }
    let handlers: Vec<&str> = info
        .status
        .runtime_handlers
        .iter()
        .map(|h| {
            if h.name.is_empty() {
                "(default)"
            } else {
                h.name.as_str()
            }
        })
        .collect();
    if !handlers.is_empty() {
        writeln!(out, "Handlers:      {}", handlers.join(", "))?;
    }
    if a.verbose {
        let mut keys: Vec<_> = info.status.info.iter().collect();
        keys.sort();
        for (k, v) in keys {
            writeln!(out, "{k}: {v}")?;
        }
    }
    Ok(0)
}
