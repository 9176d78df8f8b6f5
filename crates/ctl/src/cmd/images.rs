//! `pull`, `images`, `rmi`.

use std::io::{self, Write};

use anyhow::Context as _;
use ctl::cri;
use ctl::resolve::short_id;

use super::{print_json, with_spinner, Ctx};
use crate::table::{size, split_tag, Table};
use crate::{ImagesArgs, Output, PullArgs, RmiArgs};

pub async fn pull(ctx: &Ctx, a: PullArgs) -> anyhow::Result<u8> {
    let auth = match &a.creds {
        None => None,
        Some(creds) => {
            let (username, password) = creds
                .split_once(':')
                .context("--creds must be USER:PASSWORD")?;
            Some(cri::AuthConfig {
                username: username.to_string(),
                password: password.to_string(),
                ..Default::default()
            })
        }
    };
    let image_ref = with_spinner(
        &format!("pulling {}", a.image),
        ctx.cri.pull_image(&a.image, auth, None, None),
    )
    .await?;
    writeln!(io::stdout(), "{image_ref}")?;
    Ok(0)
}

pub async fn images(ctx: &Ctx, a: ImagesArgs) -> anyhow::Result<u8> {
    let mut images = ctx.cri.list_images().await?;
    images.sort_by(|x, y| x.repo_tags.cmp(&y.repo_tags).then(x.id.cmp(&y.id)));
    if ctx.output == Output::Json {
        print_json(&cri::ListImagesResponse { images })?;
        return Ok(0);
    }
    let mut out = io::stdout().lock();
    if a.quiet {
        for i in &images {
            writeln!(out, "{}", i.id)?;
        }
        return Ok(0);
    }
    let mut t = Table::new(&["IMAGE", "TAG", "IMAGE ID", "SIZE"]);
    for i in &images {
        let id = short_id(&i.id).to_string();
        if i.repo_tags.is_empty() {
            let repo = i
                .repo_digests
                .first()
                .map(|d| d.split('@').next().unwrap_or(d).to_string())
                .unwrap_or_else(|| "<none>".into());
            t.row(vec![repo, "<none>".into(), id, size(i.size)]);
            continue;
        }
        for tag in &i.repo_tags {
            let (repo, tag) = split_tag(tag);
            t.row(vec![repo.into(), tag.into(), id.clone(), size(i.size)]);
        }
    }
    t.write(&mut out)?;
    Ok(0)
}

pub async fn rmi(ctx: &Ctx, a: RmiArgs) -> anyhow::Result<u8> {
    let mut failed = false;
    for query in &a.images {
        let r = async {
            let img = ctx.cri.resolve_image(query).await?;
            ctx.cri.remove_image(&img.id).await?;
            Ok::<_, anyhow::Error>(img)
        }
        .await;
        match r {
            Ok(img) => {
                let mut out = io::stdout().lock();
                for tag in &img.repo_tags {
                    writeln!(out, "Deleted: {tag}")?;
                }
                writeln!(out, "Deleted: {}", img.id)?;
            }
            Err(e) => {
                eprintln!("hyperctl: error: {query}: {e:#}");
                failed = true;
            }
        }
    }
    Ok(u8::from(failed))
}
