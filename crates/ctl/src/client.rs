//! [`Cri`]: a connected CRI v1 client (RuntimeService + ImageService) with per-call timeouts.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Uri};
use tonic::Request;

use crate::cri;
use crate::resolve::{self, Candidate, Kind};
use crate::{CtlError, Endpoint};

/// The CRI API version hyperctl speaks.
pub const CRI_API_VERSION: &str = "v1";

/// A connected CRI client. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone, Debug)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    endpoint: Endpoint,
    timeout: Duration,
}

/// Which kinds [`Cri::resolve`] searches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    Pods,
    Containers,
    PodsAndContainers,
}

impl Cri {
    /// Connects to `endpoint`; `timeout` bounds the connection and, unless a call says otherwise, each call.
    pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Cri, CtlError> {
        let connect_err = |e: tonic::transport::Error| {
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            CtlError::Connect {
                endpoint: endpoint.to_string(),
                reason: cause.to_string(),
            }
        };
        let channel = async {
            match endpoint {
                Endpoint::Unix(path) => {
                    let path = path.clone();
                    // The URI is required by tonic but unused: the connector ignores it.
                    tonic::transport::Endpoint::from_static("http://[::1]:50051")
                        .connect_timeout(timeout)
                        .connect_with_connector(tower::service_fn(move |_: Uri| {
                            let path = path.clone();
                            async move {
                                Ok::<_, std::io::Error>(TokioIo::new(
                                    UnixStream::connect(path).await?,
                                ))
                            }
                        }))
                        .await
                }
                Endpoint::Tcp { host, port } => {
                    let ep =
                        tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
                            .map_err(connect_err)?;
                    ep.connect_timeout(timeout).connect().await
                }
            }
            .map_err(connect_err)
        };
        let channel = tokio::time::timeout(timeout, channel).await.map_err(|_| {
            CtlError::ConnectTimeout {
                endpoint: endpoint.to_string(),
                timeout,
            }
        })??;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            endpoint: endpoint.clone(),
            timeout,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        self.request_with(msg, Some(self.timeout))
    }

    fn request_with<T>(&self, msg: T, timeout: Option<Duration>) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = timeout {
            // tonic enforces the grpc-timeout header on the client side too
            r.set_timeout(t);
        }
        r
    }

    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    fn images(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    // ---- RuntimeService ----

    pub async fn version(&self) -> Result<cri::VersionResponse, CtlError> {
        let req = self.request(cri::VersionRequest {
            version: CRI_API_VERSION.into(),
        });
        let r = self.runtime().version(req).await.map_err(rpc("Version"))?;
        Ok(r.into_inner())
    }

    pub async fn status(&self, verbose: bool) -> Result<cri::StatusResponse, CtlError> {
        let req = self.request(cri::StatusRequest { verbose });
        let r = self.runtime().status(req).await.map_err(rpc("Status"))?;
        Ok(r.into_inner())
    }

    /// Returns the new pod's id.
    pub async fn run_pod_sandbox(
        &self,
        config: cri::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, CtlError> {
        let req = self.request(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: runtime_handler.to_string(),
        });
        let r = self
            .runtime()
            .run_pod_sandbox(req)
            .await
            .map_err(rpc("RunPodSandbox"))?
            .into_inner();
        non_empty(r.pod_sandbox_id, "RunPodSandbox", "pod sandbox id")
    }

    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CtlError> {
        let req = self.request(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        });
        self.runtime()
            .stop_pod_sandbox(req)
            .await
            .map_err(rpc("StopPodSandbox"))?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CtlError> {
        let req = self.request(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        });
        self.runtime()
            .remove_pod_sandbox(req)
            .await
            .map_err(rpc("RemovePodSandbox"))?;
        Ok(())
    }

    pub async fn pod_sandbox_status(&self, id: &str) -> Result<cri::PodSandboxStatus, CtlError> {
        let req = self.request(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: false,
        });
        let r = self
            .runtime()
            .pod_sandbox_status(req)
            .await
            .map_err(rpc("PodSandboxStatus"))?
            .into_inner();
        r.status.ok_or(CtlError::Incomplete {
            call: "PodSandboxStatus",
            what: "status",
        })
    }

    pub async fn list_pod_sandbox(
        &self,
        filter: Option<cri::PodSandboxFilter>,
    ) -> Result<Vec<cri::PodSandbox>, CtlError> {
        let req = self.request(cri::ListPodSandboxRequest { filter });
        let r = self
            .runtime()
            .list_pod_sandbox(req)
            .await
            .map_err(rpc("ListPodSandbox"))?;
        Ok(r.into_inner().items)
    }

    /// Returns the new container's id.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: cri::ContainerConfig,
        sandbox_config: cri::PodSandboxConfig,
    ) -> Result<String, CtlError> {
        let req = self.request(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        });
        let r = self
            .runtime()
            .create_container(req)
            .await
            .map_err(rpc("CreateContainer"))?
            .into_inner();
        non_empty(r.container_id, "CreateContainer", "container id")
    }

    pub async fn start_container(&self, id: &str) -> Result<(), CtlError> {
        let req = self.request(cri::StartContainerRequest {
            container_id: id.to_string(),
        });
        self.runtime()
            .start_container(req)
            .await
            .map_err(rpc("StartContainer"))?;
        Ok(())
    }

    /// Stops a container, killing it `grace` after the stop signal. The call's own timeout is extended by
    /// the grace period.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CtlError> {
        let req = self.request_with(
            cri::StopContainerRequest {
                container_id: id.to_string(),
                timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
            },
            Some(self.timeout + grace),
        );
        self.runtime()
            .stop_container(req)
            .await
            .map_err(rpc("StopContainer"))?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), CtlError> {
        let req = self.request(cri::RemoveContainerRequest {
            container_id: id.to_string(),
        });
        self.runtime()
            .remove_container(req)
            .await
            .map_err(rpc("RemoveContainer"))?;
        Ok(())
    }

    pub async fn list_containers(
        &self,
        filter: Option<cri::ContainerFilter>,
    ) -> Result<Vec<cri::Container>, CtlError> {
        let req = self.request(cri::ListContainersRequest { filter });
        let r = self
            .runtime()
            .list_containers(req)
            .await
            .map_err(rpc("ListContainers"))?;
        Ok(r.into_inner().containers)
    }

    pub async fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, CtlError> {
        let req = self.request(cri::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        });
        let r = self
            .runtime()
            .container_status(req)
            .await
            .map_err(rpc("ContainerStatus"))?
            .into_inner();
        r.status.ok_or(CtlError::Incomplete {
            call: "ContainerStatus",
            what: "status",
        })
    }

    /// Sets a container's Linux resources (UpdateContainerResources).
    pub async fn update_container_resources(
        &self,
        id: &str,
        linux: cri::LinuxContainerResources,
    ) -> Result<(), CtlError> {
        let req = self.request(cri::UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(linux),
            ..Default::default()
        });
        self.runtime()
            .update_container_resources(req)
            .await
            .map_err(rpc("UpdateContainerResources"))?;
        Ok(())
    }

    /// Asks the runtime to reopen a container's log file (after a rotation).
    pub async fn reopen_container_log(&self, id: &str) -> Result<(), CtlError> {
        let req = self.request(cri::ReopenContainerLogRequest {
            container_id: id.to_string(),
        });
        self.runtime()
            .reopen_container_log(req)
            .await
            .map_err(rpc("ReopenContainerLog"))?;
        Ok(())
    }

    /// The runtime's container event stream (GetContainerEvents); it has no deadline.
    pub async fn container_events(
        &self,
    ) -> Result<tonic::Streaming<cri::ContainerEventResponse>, CtlError> {
        let req = self.request_with(cri::GetEventsRequest {}, None);
        Ok(self
            .runtime()
            .get_container_events(req)
            .await
            .map_err(rpc("GetContainerEvents"))?
            .into_inner())
    }

    /// A pod's usage (PodSandboxStats).
    pub async fn pod_sandbox_stats(&self, id: &str) -> Result<cri::PodSandboxStats, CtlError> {
        let req = self.request(cri::PodSandboxStatsRequest {
            pod_sandbox_id: id.to_string(),
        });
        let r = self
            .runtime()
            .pod_sandbox_stats(req)
            .await
            .map_err(rpc("PodSandboxStats"))?
            .into_inner();
        r.stats.ok_or(CtlError::Incomplete {
            call: "PodSandboxStats",
            what: "stats",
        })
    }

    /// A container's usage (ContainerStats).
    pub async fn container_stats(&self, id: &str) -> Result<cri::ContainerStats, CtlError> {
        let req = self.request(cri::ContainerStatsRequest {
            container_id: id.to_string(),
        });
        let r = self
            .runtime()
            .container_stats(req)
            .await
            .map_err(rpc("ContainerStats"))?
            .into_inner();
        r.stats.ok_or(CtlError::Incomplete {
            call: "ContainerStats",
            what: "stats",
        })
    }

    /// Runs `cmd` in a container and waits for it. `timeout` (None: no limit) is passed to the runtime,
    /// which kills the command after it; the call itself may take that long plus the per-call timeout.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<cri::ExecSyncResponse, CtlError> {
        let req = self.request_with(
            cri::ExecSyncRequest {
                container_id: id.to_string(),
                cmd,
                // CRI counts whole seconds; round up so that 500ms does not mean "no timeout" (0).
                timeout: timeout.map_or(0, |t| {
                    i64::try_from(t.as_secs() + u64::from(t.subsec_nanos() > 0)).unwrap_or(i64::MAX)
                }),
            },
            timeout.map(|t| t + self.timeout),
        );
        let r = self
            .runtime()
            .exec_sync(req)
            .await
            .map_err(rpc("ExecSync"))?;
        Ok(r.into_inner())
    }

    // ---- ImageService ----

    pub async fn list_images(&self) -> Result<Vec<cri::Image>, CtlError> {
        let req = self.request(cri::ListImagesRequest { filter: None });
        let r = self
            .images()
            .list_images(req)
            .await
            .map_err(rpc("ListImages"))?;
        Ok(r.into_inner().images)
    }

    /// None when the runtime does not have the image.
    pub async fn image_status(&self, image: &str) -> Result<Option<cri::Image>, CtlError> {
        let req = self.request(cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        });
        match self.images().image_status(req).await {
            Ok(r) => Ok(r.into_inner().image),
            // CRI says "no image" is an empty answer; some runtimes answer NotFound instead.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(rpc("ImageStatus")(s)),
        }
    }

    /// Pulls an image and returns its reference. Pulls can take minutes: `timeout` None means no limit.
    pub async fn pull_image(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
        sandbox_config: Option<cri::PodSandboxConfig>,
        timeout: Option<Duration>,
    ) -> Result<String, CtlError> {
        let req = self.request_with(
            cri::PullImageRequest {
                image: Some(image_spec(image)),
                auth,
                sandbox_config,
            },
            timeout,
        );
        let r = self
            .images()
            .pull_image(req)
            .await
            .map_err(rpc("PullImage"))?
            .into_inner();
        non_empty(r.image_ref, "PullImage", "image reference")
    }

    pub async fn remove_image(&self, image: &str) -> Result<(), CtlError> {
        let req = self.request(cri::RemoveImageRequest {
            image: Some(image_spec(image)),
        });
        self.images()
            .remove_image(req)
            .await
            .map_err(rpc("RemoveImage"))?;
        Ok(())
    }

    /// Makes sure the runtime has `image`, pulling it when absent (or always, with `always_pull`); returns
    /// what to put in a container config (the image's id when it was present, else the pulled reference)
    /// and whether a pull happened.
    pub async fn ensure_image(
        &self,
        image: &str,
        always_pull: bool,
    ) -> Result<(String, bool), CtlError> {
        if !always_pull {
            if let Some(img) = self.image_status(image).await? {
                let id = if img.id.is_empty() {
                    image.to_string()
                } else {
                    img.id
                };
                return Ok((id, false));
            }
        }
        let r = self.pull_image(image, None, None, None).await?;
        Ok((r, true))
    }

    // ---- resolution ----

    /// Resolves a pod or container id prefix, or an exact name, to one object (see [`resolve::resolve`]).
    pub async fn resolve(&self, query: &str, search: Search) -> Result<Candidate, CtlError> {
        let (pods, containers) = match search {
            Search::Pods => (self.list_pod_sandbox(None).await?, Vec::new()),
            Search::Containers => (Vec::new(), self.list_containers(None).await?),
            Search::PodsAndContainers => {
                tokio::try_join!(self.list_pod_sandbox(None), self.list_containers(None))?
            }
        };
        let mut candidates: Vec<Candidate> = pods
            .into_iter()
            .map(|p| Candidate {
                kind: Kind::Pod,
                names: p.metadata.map(|m| m.name).into_iter().collect(),
                id: p.id,
                pod: None,
            })
            .collect();
        candidates.extend(containers.into_iter().map(|c| Candidate {
            kind: Kind::Container,
            names: c.metadata.map(|m| m.name).into_iter().collect(),
            id: c.id,
            pod: Some(c.pod_sandbox_id),
        }));
        let kinds = match search {
            Search::Pods => "pod",
            Search::Containers => "container",
            Search::PodsAndContainers => "pod or container",
        };
        Ok(resolve::resolve(query, &candidates, kinds)?.clone())
    }

    /// Resolves an image reference the runtime knows (`busybox`), an image id prefix, or a tag.
    pub async fn resolve_image(&self, query: &str) -> Result<cri::Image, CtlError> {
        if let Some(img) = self.image_status(query).await? {
            return Ok(img);
        }
        let images = self.list_images().await?;
        let candidates: Vec<Candidate> = images
            .iter()
            .map(|i| Candidate {
                kind: Kind::Image,
                id: i.id.clone(),
                names: i.repo_tags.iter().chain(&i.repo_digests).cloned().collect(),
                pod: None,
            })
            .collect();
        let found = resolve::resolve(query, &candidates, "image")?;
        let idx = candidates
            .iter()
            .position(|c| std::ptr::eq(c, found))
            .unwrap_or_default();
        Ok(images[idx].clone())
    }
}

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

fn rpc(call: &'static str) -> impl Fn(tonic::Status) -> CtlError {
    move |status| CtlError::Rpc {
        call,
        status: Box::new(status),
    }
}

fn non_empty(s: String, call: &'static str, what: &'static str) -> Result<String, CtlError> {
    if s.is_empty() {
        Err(CtlError::Incomplete { call, what })
    } else {
        Ok(s)
    }
}
