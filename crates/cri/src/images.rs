//! CRI ImageService over the image store (`crates/image`).

use std::sync::Arc;

use image::{Auth, ImageError, ImageRecord, ImageStore};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService;
use tonic::{Request, Response, Status};

/// The image service: pulls into, lists and removes from the image store.
pub struct Images {
    store: Arc<ImageStore>,
    /// Where the store lives (reported by ImageFsInfo).
    root: std::path::PathBuf,
    /// Whether an image (by id) is used by a container; such images are not removed.
    in_use: Arc<dyn Fn(&image::Digest) -> bool + Send + Sync>,
}

impl Images {
    pub fn new(
        store: Arc<ImageStore>,
        root: std::path::PathBuf,
        in_use: Arc<dyn Fn(&image::Digest) -> bool + Send + Sync>,
    ) -> Images {
        Images {
            store,
            root,
            in_use,
        }
    }

    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }
}

/// The CRI view of an image record.
pub fn to_cri(r: &ImageRecord) -> cri::Image {
    let (uid, username) = image_user(&r.config.user);
    cri::Image {
        id: r.id.to_string(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid: uid.map(|value| cri::Int64Value { value }),
        username,
        spec: Some(cri::ImageSpec {
            image: r.id.to_string(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// The image config's `User`: a numeric uid (CRI `uid`) or a name (`username`); the group
/// part is not part of the CRI answer.
fn image_user(user: &str) -> (Option<i64>, String) {
    let name = user.split(':').next().unwrap_or_default();
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) if name.is_empty() => (None, String::new()),
        Err(_) => (None, name.to_owned()),
    }
}

/// Maps image store errors to gRPC statuses.
pub fn status(e: ImageError) -> Status {
    let text = crate::error_chain(&e);
    match e {
        ImageError::Reference(_) => Status::invalid_argument(text),
        ImageError::InUse(_) => Status::failed_precondition(text),
        _ if text.contains("not found") || text.contains("unknown") => Status::not_found(text),
        _ => Status::internal(text),
    }
}

fn image_name(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(name) if !name.trim().is_empty() => Ok(name),
        _ => Err(Status::invalid_argument("image is empty")),
    }
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let images = self
            .store
            .list(filter.as_deref())
            .iter()
            .map(to_cri)
            .collect();
        Ok(Response::new(cri::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = request.into_inner();
        let name = image_name(req.image.as_ref())?;
        // An unknown image is not an error: the response has no image.
        let image = self.store.status(name).as_ref().map(to_cri);
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            if let Some(r) = self.store.status(name) {
                info.insert(
                    "info".to_owned(),
                    serde_json::to_string(&r).unwrap_or_default(),
                );
            }
        }
        Ok(Response::new(cri::ImageStatusResponse { image, info }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = request.into_inner();
        let name = image_name(req.image.as_ref())?.to_owned();
        let auth = match req.auth {
            None => Auth::Anonymous,
            Some(a) => Auth::from_cri(
                &a.username,
                &a.password,
                &a.auth,
                &a.identity_token,
                &a.registry_token,
            )
            .map_err(|e| Status::invalid_argument(crate::error_chain(&e)))?,
        };
        log::info!("pulling {name}");
        let record = self.store.pull(&name, &auth).await.map_err(status)?;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: record.id.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let req = request.into_inner();
        let name = image_name(req.image.as_ref())?;
        // Idempotent: an image that is gone already is fine.
        if self.store.status(name).is_none() {
            return Ok(Response::new(cri::RemoveImageResponse {}));
        }
        let in_use = self.in_use.clone();
        self.store.remove(name, |d| in_use(d)).map_err(status)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let (used, inodes) = self
            .store
            .fs_usage()
            .map_err(|e| Status::internal(crate::error_chain(&e)))?;
        let usage = cri::FilesystemUsage {
            timestamp: crate::now_nanos(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: self.root.display().to_string(),
            }),
            used_bytes: Some(cri::UInt64Value { value: used }),
            inodes_used: Some(cri::UInt64Value { value: inodes }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![usage.clone()],
            container_filesystems: vec![usage],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_users() {
        assert_eq!(image_user("1000:1000"), (Some(1000), String::new()));
        assert_eq!(image_user("nginx"), (None, "nginx".to_owned()));
        assert_eq!(image_user(""), (None, String::new()));
        assert_eq!(image_user("www:www"), (None, "www".to_owned()));
    }
}
