//! Descriptors from gRPC server reflection: before a config is built, a backend with
//! `reflection: true` is asked for its services and the files that define them (v1, falling back
//! to v1alpha), so no proto needs to sit beside the gateway. Runs at load and on every reload;
//! the routes are then built from what the server said, like from compiled protos.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use super::transport::Transport;
use http::uri::PathAndQuery;
use prost::Message;
use tokio::sync::mpsc;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, ServerReflectionResponse, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse,
};

const V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
/// v1alpha's messages are the same on the wire; only the path differs.
const V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// Files that are never asked for: the well-known types are the same everywhere and always
/// available locally.
fn local(name: &str) -> bool {
    name.starts_with("google/protobuf/")
}

/// The serialized `FileDescriptorProto`s of every service the server offers (besides reflection
/// itself) and of their imports, except the well-known types.
pub async fn fetch(channel: Transport, within: Duration) -> Result<Vec<Vec<u8>>, String> {
    let run = async {
        match session(channel.clone(), V1).await {
            Err(Failure::Unimplemented) => session(channel, V1ALPHA).await,
            other => other,
        }
    };
    match tokio::time::timeout(within, run).await {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(Failure::Unimplemented)) => {
            Err("the server does not offer gRPC reflection (v1 or v1alpha)".into())
        }
        Ok(Err(Failure::Other(e))) => Err(format!("reflection failed: {e}")),
        Err(_) => Err(format!(
            "reflection did not finish within {}",
            humantime::format_duration(within)
        )),
    }
}

enum Failure {
    Unimplemented,
    Other(String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::Unimplemented {
            Failure::Unimplemented
        } else {
            Failure::Other(format!("{:?}: {}", s.code(), s.message()))
        }
    }
}

/// One reflection stream: list the services, then ask for the file of each and for every
/// import not received yet, one request at a time.
async fn session(channel: Transport, path: &'static str) -> Result<Vec<Vec<u8>>, Failure> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Failure::Other(format!("cannot connect: {e}")))?;
    let (tx, rx) = mpsc::channel::<ServerReflectionRequest>(1);
    let requests =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    tx.send(ask(MessageRequest::ListServices(String::new())))
        .await
        .map_err(|_| Failure::Other("the stream closed".into()))?;
    let codec =
        tonic_prost::ProstCodec::<ServerReflectionRequest, ServerReflectionResponse>::default();
    let mut replies = grpc
        .streaming(
            tonic::Request::new(requests),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?
        .into_inner();
    let mut next = async || -> Result<MessageResponse, Failure> {
        let reply = replies
            .message()
            .await?
            .ok_or_else(|| Failure::Other("the server ended the stream early".into()))?;
        match reply.message_response {
            Some(MessageResponse::ErrorResponse(e)) => Err(Failure::Other(format!(
                "the server answered error {}: {}",
                e.error_code, e.error_message
            ))),
            Some(other) => Ok(other),
            None => Err(Failure::Other("an empty reflection answer".into())),
        }
    };

    let services: Vec<String> = match next().await? {
        MessageResponse::ListServicesResponse(l) => l
            .service
            .into_iter()
            .map(|s| s.name)
            .filter(|n| !n.starts_with("grpc.reflection."))
            .collect(),
        _ => {
            return Err(Failure::Other(
                "an unexpected answer to ListServices".into(),
            ));
        }
    };
    let mut files = Vec::new();
    let mut have: HashSet<String> = HashSet::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut take = |raw: Vec<Vec<u8>>,
                    have: &mut HashSet<String>,
                    wanted: &mut BTreeSet<String>|
     -> Result<(), Failure> {
        for bytes in raw {
            let fd = prost_types::FileDescriptorProto::decode(bytes.as_slice())
                .map_err(|e| Failure::Other(format!("a file descriptor does not decode: {e}")))?;
            let name = fd.name.unwrap_or_default();
            if !have.insert(name.clone()) {
                continue;
            }
            wanted.remove(&name);
            for dep in fd.dependency {
                if !local(&dep) && !have.contains(&dep) {
                    wanted.insert(dep);
                }
            }
            if !local(&name) {
                files.push(bytes);
            }
        }
        Ok(())
    };
    for service in services {
        tx.send(ask(MessageRequest::FileContainingSymbol(service)))
            .await
            .map_err(|_| Failure::Other("the stream closed".into()))?;
        match next().await? {
            MessageResponse::FileDescriptorResponse(f) => {
                take(f.file_descriptor_proto, &mut have, &mut wanted)?
            }
            _ => return Err(Failure::Other("an unexpected answer to a symbol".into())),
        }
    }
    while let Some(dep) = wanted.pop_first() {
        tx.send(ask(MessageRequest::FileByFilename(dep.clone())))
            .await
            .map_err(|_| Failure::Other("the stream closed".into()))?;
        match next().await {
            Ok(MessageResponse::FileDescriptorResponse(f)) => {
                take(f.file_descriptor_proto, &mut have, &mut wanted)?
            }
            Ok(_) => return Err(Failure::Other("an unexpected answer to a file".into())),
            Err(Failure::Other(e)) => {
                return Err(Failure::Other(format!(
                    "the server cannot give `{dep}`: {e}"
                )));
            }
            Err(Failure::Unimplemented) => return Err(Failure::Unimplemented),
        }
    }
    drop(tx);
    Ok(files)
}

/// The names of the files a reflected set imports but does not hold (the well-known types, or
/// files the gateway has built in), so the loader can compile them locally.
pub fn missing_imports(files: &[Vec<u8>]) -> Vec<String> {
    let mut names = HashSet::new();
    let mut deps = BTreeSet::new();
    for bytes in files {
        if let Ok(fd) = prost_types::FileDescriptorProto::decode(bytes.as_slice()) {
            names.insert(fd.name.unwrap_or_default());
            deps.extend(fd.dependency);
        }
    }
    deps.into_iter().filter(|d| !names.contains(d)).collect()
}

/// A `FileDescriptorSet` holding the given serialized files, byte for byte (options such as
/// `google.api.http` survive, which a decode into prost-types would drop).
pub fn encode_set(files: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in files {
        prost::encoding::bytes::encode(1, f, &mut out);
    }
    out
}
