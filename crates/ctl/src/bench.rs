//! The pod lifecycle benchmark: N pods, P in flight, each RunPodSandbox -> CreateContainer ->
//! StartContainer -> StopPodSandbox -> RemovePodSandbox, every call timed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};

use crate::spec::{self, ContainerSpec, PodSpec};
use crate::stats::Summary;
use crate::{Cri, CtlError};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub pods: usize,
    pub parallel: usize,
    pub image: String,
    /// The container's command (entrypoint override); empty: the image's default.
    pub command: Vec<String>,
    /// RuntimeClass handler for RunPodSandbox ("" = the runtime's default).
    pub runtime_handler: String,
    /// Pod log root (kubelet's /var/log/pods); None: containers log nowhere.
    pub log_root: Option<PathBuf>,
    /// Label for the summary line (`pod_start_ms <label>=<p50>`).
    pub label: String,
}

/// The phases reported, in order. `pod_start` = run + create + start; `total` = all five calls.
pub const PHASES: [&str; 7] = [
    "run_pod_sandbox",
    "create_container",
    "start_container",
    "pod_start",
    "stop_pod_sandbox",
    "remove_pod_sandbox",
    "total",
];

/// Per-call durations of one successful lifecycle.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    pub run: Duration,
    pub create: Duration,
    pub start: Duration,
    pub stop: Duration,
    pub remove: Duration,
}

impl Sample {
    /// The sample's value for each of [`PHASES`], in milliseconds.
    pub fn phases_ms(&self) -> [f64; 7] {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let start = self.run + self.create + self.start;
        [
            ms(self.run),
            ms(self.create),
            ms(self.start),
            ms(start),
            ms(self.stop),
            ms(self.remove),
            ms(start + self.stop + self.remove),
        ]
    }
}

/// One phase's statistics.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PhaseSummary {
    pub phase: &'static str,
    #[serde(flatten)]
    pub summary: Summary,
}

/// The benchmark's outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub label: String,
    pub endpoint: String,
    pub pods: usize,
    pub parallel: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// The first few failures, as messages.
    pub errors: Vec<String>,
    /// Wall-clock time of the whole run.
    pub wall_ms: f64,
    pub phases: Vec<PhaseSummary>,
}

impl BenchReport {
    /// Builds the statistics from the samples of the successful lifecycles.
    pub fn from_samples(
        cfg: &BenchConfig,
        endpoint: String,
        samples: &[Sample],
        errors: Vec<String>,
        wall: Duration,
    ) -> BenchReport {
        let per_phase: Vec<[f64; 7]> = samples.iter().map(Sample::phases_ms).collect();
        let phases = PHASES
            .iter()
            .enumerate()
            .filter_map(|(i, &phase)| {
                let values: Vec<f64> = per_phase.iter().map(|p| p[i]).collect();
                Summary::of(&values).map(|summary| PhaseSummary { phase, summary })
            })
            .collect();
        let failed = errors.len();
        BenchReport {
            label: cfg.label.clone(),
            endpoint,
            pods: cfg.pods,
            parallel: cfg.parallel,
            succeeded: samples.len(),
            failed,
            errors: errors.into_iter().take(5).collect(),
            wall_ms: wall.as_secs_f64() * 1000.0,
            phases,
        }
    }

    pub fn phase(&self, name: &str) -> Option<&Summary> {
        self.phases
            .iter()
            .find(|p| p.phase == name)
            .map(|p| &p.summary)
    }

    /// `pod_start_ms <label>=<p50>`, the line that make targets combine into ratios; None when no pod
    /// started.
    pub fn pod_start_line(&self) -> Option<String> {
        self.phase("pod_start")
            .map(|s| format!("pod_start_ms {}={:.1}", self.label, s.p50))
    }
}

/// Runs the benchmark. The image is made present first (not timed). Failed lifecycles are counted and
/// cleaned up; they do not stop the run.
pub async fn run(cri: &Cri, cfg: &BenchConfig) -> Result<BenchReport, CtlError> {
    let (image, _) = cri.ensure_image(&cfg.image, false).await?;
    let run_id = format!("{:06x}", spec::random_u64() & 0xff_ffff);
    let started = Instant::now();
    let results: Vec<Result<Sample, CtlError>> = stream::iter(0..cfg.pods)
        .map(|i| lifecycle(cri, cfg, &image, format!("hyperctl-bench-{run_id}-{i}")))
        .buffer_unordered(cfg.parallel.max(1))
        .collect()
        .await;
    let wall = started.elapsed();
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(s) => samples.push(s),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Ok(BenchReport::from_samples(
        cfg,
        cri.endpoint().to_string(),
        &samples,
        errors,
        wall,
    ))
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, CtlError>>,
) -> Result<(T, Duration), CtlError> {
    let t = Instant::now();
    let v = f.await?;
    Ok((v, t.elapsed()))
}

async fn lifecycle(
    cri: &Cri,
    cfg: &BenchConfig,
    image: &str,
    name: String,
) -> Result<Sample, CtlError> {
    let mut pod = PodSpec::new(&name);
    pod.log_root = cfg.log_root.clone();
    pod.labels
        .insert(spec::CREATED_BY_LABEL.into(), "bench".into());
    let container = ContainerSpec {
        name: "bench".into(),
        image: image.to_string(),
        user_image: cfg.image.clone(),
        command: cfg.command.clone(),
        ..Default::default()
    };
    spec::prepare_log_dirs(&pod, &container)?;
    let pod_config = pod.config();
    let result = async {
        let (pod_id, run) =
            timed(cri.run_pod_sandbox(pod_config.clone(), &cfg.runtime_handler)).await?;
        let started = async {
            let (cid, create) = timed(cri.create_container(
                &pod_id,
                container.config(pod.log_root.is_some()),
                pod_config.clone(),
            ))
            .await?;
            let ((), start) = timed(cri.start_container(&cid)).await?;
            Ok::<_, CtlError>((create, start))
        }
        .await;
        let (create, start) = match started {
            Ok(v) => v,
            Err(e) => {
                let _ = cri.stop_pod_sandbox(&pod_id).await;
                let _ = cri.remove_pod_sandbox(&pod_id).await;
                return Err(e);
            }
        };
        let ((), stop) = timed(cri.stop_pod_sandbox(&pod_id)).await?;
        let ((), remove) = timed(cri.remove_pod_sandbox(&pod_id)).await?;
        Ok(Sample {
            run,
            create,
            start,
            stop,
            remove,
        })
    }
    .await;
    spec::remove_log_dir(&pod);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn report_statistics() {
        let cfg = BenchConfig {
            pods: 3,
            parallel: 2,
            image: "busybox".into(),
            command: vec![],
            runtime_handler: String::new(),
            log_root: None,
            label: "hyperd".into(),
        };
        let samples: Vec<Sample> = [10, 20, 30]
            .iter()
            .map(|&v| Sample {
                run: ms(v),
                create: ms(1),
                start: ms(2),
                stop: ms(3),
                remove: ms(4),
            })
            .collect();
        let r = BenchReport::from_samples(&cfg, "e".into(), &samples, vec![], ms(100));
        assert_eq!(r.phases.len(), PHASES.len());
        let start = r.phase("pod_start").unwrap();
        assert_eq!(start.n, 3);
        assert!((start.p50 - 23.0).abs() < 1e-9);
        assert!((start.p99 - 33.0).abs() < 1e-9);
        let total = r.phase("total").unwrap();
        assert!((total.max - 40.0).abs() < 1e-9);
        assert_eq!(r.pod_start_line().unwrap(), "pod_start_ms hyperd=23.0");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["phases"][0]["phase"], "run_pod_sandbox");
        assert_eq!(json["phases"][0]["p50"], 20.0);

        let none = BenchReport::from_samples(&cfg, "e".into(), &[], vec!["x".into()], ms(1));
        assert!(none.phases.is_empty());
        assert_eq!(none.failed, 1);
        assert_eq!(none.pod_start_line(), None);
    }
}
