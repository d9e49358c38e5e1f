//! The gRPC server the bridge tests talk to: the example order service itself, so the example
//! is exercised by the suite.

#[path = "../../../examples/shop/mod.rs"]
mod shop;

pub use shop::{GrpcServer, Reflection, pool, proto_dir};

/// A gRPC server for any service whose methods return their own request type: every method
/// answers with the request exactly as it arrived.
pub struct EchoServer {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoServer {
    pub async fn start(pool: prost_reflect::DescriptorPool) -> EchoServer {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use switchyard::backends::grpc::codec::DynamicCodec;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let pool = pool.clone();
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let pool = pool.clone();
                        async move {
                            let name = req.uri().path().trim_start_matches('/').replace('/', ".");
                            let (svc, m) = name.rsplit_once('.').unwrap_or(("", ""));
                            let method = pool
                                .get_service_by_name(svc)
                                .and_then(|s| s.methods().find(|x| x.name() == m));
                            let Some(method) = method else {
                                return Ok::<_, std::convert::Infallible>(
                                    tonic::Status::unimplemented("no such method").into_http(),
                                );
                            };
                            let mut grpc =
                                tonic::server::Grpc::new(DynamicCodec::new(method.input()));
                            let echo = tower::service_fn(
                                |r: tonic::Request<prost_reflect::DynamicMessage>| async move {
                                    Ok::<_, tonic::Status>(tonic::Response::new(r.into_inner()))
                                },
                            );
                            Ok(grpc.unary(echo, req).await)
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .http2_only()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        EchoServer { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
