//! `stop` and `rm`: for pods and containers alike, told apart by what the id resolves to.

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use ctl::client::Search;
use ctl::resolve::{short_id, Kind};
use ctl::{cri, spec, Cri};

use super::Ctx;
use crate::{RmArgs, StopArgs};

pub async fn stop(ctx: &Ctx, a: StopArgs) -> anyhow::Result<u8> {
    let grace = Duration::from_secs(a.grace);
    let mut failed = false;
    for query in &a.ids {
        let r = async {
            let c = ctx.cri.resolve(query, Search::PodsAndContainers).await?;
            match c.kind {
                Kind::Pod => ctx.cri.stop_pod_sandbox(&c.id).await?,
                _ => ctx.cri.stop_container(&c.id, grace).await?,
            }
            Ok::<_, anyhow::Error>(c.id)
        }
        .await;
        report(query, r, &mut failed)?;
    }
    Ok(u8::from(failed))
}

pub async fn rm(ctx: &Ctx, a: RmArgs) -> anyhow::Result<u8> {
    let mut failed = false;
    if a.all {
        for p in ctx.cri.list_pod_sandbox(None).await? {
            let r = remove_pod(&ctx.cri, &p.id, a.force)
                .await
                .map(|()| p.id.clone());
            report(&p.id, r, &mut failed)?;
        }
        return Ok(u8::from(failed));
    }
    for query in &a.ids {
        let r = async {
            let c = ctx.cri.resolve(query, Search::PodsAndContainers).await?;
            match c.kind {
                Kind::Pod => remove_pod(&ctx.cri, &c.id, a.force).await?,
                _ => remove_container(&ctx.cri, &c.id, a.force).await?,
            }
            Ok::<_, anyhow::Error>(c.id)
        }
        .await;
        report(query, r, &mut failed)?;
    }
    Ok(u8::from(failed))
}

/// Prints the id of what was done (stdout), or the error (stderr), and goes on with the next one.
fn report(query: &str, r: anyhow::Result<String>, failed: &mut bool) -> anyhow::Result<()> {
    match r {
        Ok(id) => writeln!(io::stdout(), "{id}")?,
        Err(e) => {
            eprintln!("hyperctl: error: {query}: {e:#}");
            *failed = true;
        }
    }
    Ok(())
}

async fn remove_pod(cri: &Cri, id: &str, force: bool) -> anyhow::Result<()> {
    let status = cri.pod_sandbox_status(id).await?;
    if status.state == cri::PodSandboxState::SandboxReady as i32 {
        if !force {
            anyhow::bail!(
                "pod {} is ready (running): stop it first, or use rm -f",
                short_id(id)
            );
        }
        cri.stop_pod_sandbox(id).await?;
    }
    cri.remove_pod_sandbox(id).await?;
    remove_log_dir(&status);
    Ok(())
}

/// Removes the log directory that `hyperctl run` created for the pod, if its annotation names one whose
/// last component is the pod's own `<namespace>_<name>_<uid>` (never anything else an annotation names).
fn remove_log_dir(status: &cri::PodSandboxStatus) {
    let (Some(dir), Some(m)) = (
        status.annotations.get(spec::LOG_DIRECTORY_ANNOTATION),
        &status.metadata,
    ) else {
        return;
    };
    let dir = Path::new(dir);
    let expected = format!("{}_{}_{}", m.namespace, m.name, m.uid);
    if dir.is_absolute() && dir.file_name().is_some_and(|n| n == expected.as_str()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn remove_container(cri: &Cri, id: &str, force: bool) -> anyhow::Result<()> {
    let status = cri.container_status(id).await?;
    if status.state == cri::ContainerState::ContainerRunning as i32 {
        if !force {
            anyhow::bail!(
                "container {} is running: stop it first, or use rm -f",
                short_id(id)
            );
        }
        cri.stop_container(id, Duration::ZERO).await?;
    }
    cri.remove_container(id).await?;
    Ok(())
}
