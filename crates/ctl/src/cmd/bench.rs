//! `hyperctl bench`.

use std::io::{self, Write};

use ctl::bench::{self, BenchConfig};

use super::{print_json, Ctx};
use crate::table::Table;
use crate::{BenchArgs, Output};

pub async fn bench(ctx: &Ctx, a: BenchArgs) -> anyhow::Result<u8> {
    let cfg = BenchConfig {
        pods: a.pods as usize,
        parallel: a.parallel as usize,
        image: a.image,
        command: if a.command.is_empty() {
            vec!["sleep".into(), "3600".into()]
        } else {
            a.command
        },
        runtime_handler: ctx.runtime.clone(),
        log_root: (!a.no_logs).then_some(a.log_root),
        label: a.label.unwrap_or_else(|| ctx.cri.endpoint().label()),
    };
    let report = bench::run(&ctx.cri, &cfg).await?;
    if ctx.output == Output::Json {
        print_json(&report)?;
    } else {
        let mut out = io::stdout().lock();
        writeln!(
            out,
            "bench: {} pods, {} in flight, image {}, runtime handler {}, endpoint {}",
            cfg.pods,
            cfg.parallel,
            cfg.image,
            if cfg.runtime_handler.is_empty() {
                "(default)"
            } else {
                &cfg.runtime_handler
            },
            report.endpoint
        )?;
        let mut t = Table::new(&[
            "PHASE", "N", "P50 MS", "P99 MS", "MIN MS", "MAX MS", "MEAN MS",
        ]);
        for p in &report.phases {
            let s = &p.summary;
            t.row(vec![
                p.phase.to_string(),
                s.n.to_string(),
                format!("{:.1}", s.p50),
                format!("{:.1}", s.p99),
                format!("{:.1}", s.min),
                format!("{:.1}", s.max),
                format!("{:.1}", s.mean),
            ]);
        }
        t.write(&mut out)?;
        let secs = report.wall_ms / 1000.0;
        writeln!(
            out,
            "wall {:.1} ms, {:.2} pods/s, {} ok, {} failed",
            report.wall_ms,
            if secs > 0.0 {
                report.succeeded as f64 / secs
            } else {
                0.0
            },
            report.succeeded,
            report.failed
        )?;
        if let Some(line) = report.pod_start_line() {
            writeln!(out, "{line}")?;
        }
    }
    for e in &report.errors {
        eprintln!("hyperctl: bench: {e}");
    }
    Ok(u8::from(report.failed > 0))
}
