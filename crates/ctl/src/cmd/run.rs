//! `hyperctl run`: one pod with one container, its output streamed, its exit code returned.

use std::io::{self, Write};
use std::time::Duration;

use anyhow::Context as _;
use ctl::logfmt::{Record, Stream};
use ctl::logs::{self, LogEnd};
use ctl::spec::{self, ContainerSpec, PodSpec};
use ctl::Cri;

use super::{exit_code, wait_exited, with_spinner, Ctx};
use crate::RunArgs;

/// Exit status after ^C, as shells report SIGINT.
const INTERRUPTED: u8 = 130;

pub async fn run(ctx: &Ctx, a: RunArgs) -> anyhow::Result<u8> {
    let cri = &ctx.cri;
    let present = if a.pull {
        None
    } else {
        cri.image_status(&a.image).await?
    };
    let image = match present {
        Some(img) if !img.id.is_empty() => img.id,
        Some(_) => a.image.clone(),
        None => with_spinner(
            &format!("pulling {}", a.image),
            cri.pull_image(&a.image, None, None, None),
        )
        .await
        .with_context(|| format!("cannot pull {}", a.image))?,
    };

    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("hyperctl-{:08x}", spec::random_u64() as u32));
    let mut pod = PodSpec::new(&name);
    pod.log_root = Some(a.log_root.clone());
    pod.labels
        .insert(spec::CREATED_BY_LABEL.into(), "run".into());
    let container = ContainerSpec {
        name: name.clone(),
        image,
        user_image: a.image.clone(),
        command: a.entrypoint.clone().into_iter().collect(),
        args: a.command.clone(),
        envs: a.env.clone(),
        ..Default::default()
    };
    spec::prepare_log_dirs(&pod, &container)?;
    let mut pod_config = pod.config();
    if let Some(dir) = pod.log_directory() {
        pod_config.annotations.insert(
            spec::LOG_DIRECTORY_ANNOTATION.into(),
            dir.to_string_lossy().into_owned(),
        );
    }

    let pod_id = match cri.run_pod_sandbox(pod_config.clone(), &ctx.runtime).await {
        Ok(id) => id,
        Err(e) => {
            spec::remove_log_dir(&pod);
            return Err(e.into());
        }
    };
    let result = create_and_follow(cri, &pod_id, &pod, &container, pod_config, a.detach).await;
    if a.rm {
        let cleanup = async {
            cri.stop_pod_sandbox(&pod_id).await?;
            cri.remove_pod_sandbox(&pod_id).await
        };
        if let Err(e) = cleanup.await {
            eprintln!("hyperctl: warning: cannot remove pod {pod_id}: {e}");
        } else {
            spec::remove_log_dir(&pod);
        }
    }
    result
}

async fn create_and_follow(
    cri: &Cri,
    pod_id: &str,
    pod: &PodSpec,
    container: &ContainerSpec,
    pod_config: ctl::cri::PodSandboxConfig,
    detach: bool,
) -> anyhow::Result<u8> {
    let cid = cri
        .create_container(pod_id, container.config(pod.log_root.is_some()), pod_config)
        .await?;
    cri.start_container(&cid).await?;
    if detach {
        writeln!(io::stdout(), "{cid}")?;
        return Ok(0);
    }
    let follow = async {
        let status = cri.container_status(&cid).await?;
        let path = logs::log_path(&status)
            .or_else(|| pod.log_directory().map(|d| d.join(container.log_path())));
        let end = match path {
            Some(path) => logs::stream(cri, &cid, &path, true, print_record).await?,
            None => LogEnd::SinkClosed,
        };
        let status = match end {
            LogEnd::Exited(s) => *s,
            LogEnd::Gone => anyhow::bail!("container {cid} disappeared while running"),
            // no log, or nowhere to print it: just wait
            LogEnd::Read | LogEnd::SinkClosed => wait_exited(cri, &cid).await?,
        };
        if !status.reason.is_empty() && status.exit_code != 0 && status.reason != "Error" {
            eprintln!("hyperctl: container exited: {}", status.reason);
        }
        Ok(exit_code(status.exit_code))
    };
    tokio::select! {
        r = follow => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("hyperctl: interrupted: stopping container {cid}");
            if let Err(e) = cri.stop_container(&cid, Duration::from_secs(2)).await {
                eprintln!("hyperctl: warning: cannot stop container {cid}: {e}");
            }
            Ok(INTERRUPTED)
        }
    }
}

/// Writes a record to stdout or stderr; false when that stream is gone.
pub fn print_record(r: &Record) -> bool {
    let bytes = r.output();
    let ok = match r.stream {
        Stream::Stdout => {
            let mut out = io::stdout().lock();
            out.write_all(&bytes).and_then(|()| out.flush())
        }
        Stream::Stderr => io::stderr().lock().write_all(&bytes),
    };
    ok.is_ok()
}
