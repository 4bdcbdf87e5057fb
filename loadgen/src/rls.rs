//! Envoy's rate limit service as a target: unary
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` calls over HTTP/2 cleartext
//! (h2c), made as Envoy's `ratelimit` filter makes them: a few connections per target, each
//! carrying many calls at once as streams.
//!
//! - [`RlsCall`]: what every call asks (domain, descriptors), parsed from the command line.
//! - `Connections`: the HTTP/2 connections, opened on first use and again after one closes.
//! - [`outcome`]: reading an answer (pure): `grpc-status` 0, then `overall_code` OK is allowed
//!   and OVER_LIMIT refused, as 200 and 429 are for `/rate`; anything else is an error.
//!
//! The messages are envoy-types' (the ones the limiter serves), encoded with prost; the gRPC
//! framing (a flag byte and a 4-byte length before each message) is written here, and no gRPC
//! client library is involved.

use std::sync::{OnceLock, RwLock};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry as PbEntry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpStream;

use crate::endpoints::MAX_TARGETS;
use crate::record::{ErrorKind, Outcome};
use crate::{Error, Result};

/// The method's path on the gRPC listener.
pub const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// Most HTTP/2 connections per target.
pub const MAX_CONNECTIONS: usize = 1024;

/// What every `ShouldRateLimit` call of a run asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsCall {
    /// The rules' domain (`domain:` in the limiter's RLS files).
    pub domain: String,
    /// The request's descriptors, each a list of entries (at least one of each).
    pub descriptors: Vec<Vec<Entry>>,
    /// HTTP/2 connections per target. Calls take them in turn (closed loop: worker `w` always
    /// uses connection `w mod connections`), and each carries its calls as concurrent streams.
    pub connections: usize,
}

/// One descriptor entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// `None`: the request's key from the plan's [`Keys`](crate::Keys), so that calls spread
    /// over a key space as `/rate`'s `?key=` does.
    pub value: Option<String>,
}

impl RlsCall {
    /// One connection per target, no descriptor yet.
    pub fn new(domain: impl Into<String>) -> RlsCall {
        RlsCall {
            domain: domain.into(),
            descriptors: Vec::new(),
            connections: 1,
        }
    }

    /// One descriptor from `KEY=VALUE[,KEY=VALUE...]`; a `KEY` without `=VALUE` takes the
    /// request's key (`--keys`). E.g. `client_id=bench`, `remote_address`, `api_key=a,path=/x`.
    pub fn parse_descriptor(s: &str) -> Result<Vec<Entry>> {
        let invalid = |reason: String| Error::InvalidDescriptor {
            input: s.to_owned(),
            reason,
        };
        let mut entries = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let (key, value) = match part.split_once('=') {
                Some((key, value)) => (key.trim(), Some(value.trim())),
                None => (part, None),
            };
            if key.is_empty() {
                return Err(invalid(
                    "expected KEY=VALUE or KEY, separated by commas".to_owned(),
                ));
            }
            if value.is_some_and(str::is_empty) {
                return Err(invalid(format!(
                    "`{key}=` has no value (write `{key}` alone for the request's key)"
                )));
            }
            entries.push(Entry {
                key: key.to_owned(),
                value: value.map(str::to_owned),
            });
        }
        Ok(entries)
    }

    /// Every problem, as plan validation lists them.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.domain.trim().is_empty() {
            problems.push("RLS domain must not be empty".to_owned());
        }
        if self.descriptors.is_empty() {
            problems.push("RLS calls need at least one descriptor (--rls-descriptor)".to_owned());
        }
        if self.descriptors.iter().any(Vec::is_empty) {
            problems.push("every RLS descriptor needs at least one entry".to_owned());
        }
        if self.descriptors.iter().flatten().any(|e| e.key.is_empty()) {
            problems.push("RLS descriptor entries need a key".to_owned());
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            problems.push(format!(
                "RLS connections must be 1 to {MAX_CONNECTIONS}, got {}",
                self.connections
            ));
        }
        problems
    }

    /// Whether some entry takes the request's key (else every call is the same bytes).
    fn varies(&self) -> bool {
        self.descriptors.iter().flatten().any(|e| e.value.is_none())
    }

    /// The gRPC message of a call for `key`, in its length-prefixed frame. `hits` 1 is left
    /// out (`hits_addend` 0 means 1).
    pub fn frame(&self, key: &str, hits: u32) -> Bytes {
        let request = RateLimitRequest {
            domain: self.domain.clone(),
            descriptors: self
                .descriptors
                .iter()
                .map(|entries| RateLimitDescriptor {
                    entries: entries
                        .iter()
                        .map(|e| PbEntry {
                            key: e.key.clone(),
                            value: e.value.clone().unwrap_or_else(|| key.to_owned()),
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            hits_addend: if hits == 1 { 0 } else { hits },
        };
        let len = request.encoded_len();
        let mut buf = BytesMut::with_capacity(5 + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len).expect("a request far below 4 GiB"));
        request
            .encode(&mut buf)
            .expect("the buffer was sized for the message");
        buf.freeze()
    }
}

/// The outcome of an answer: HTTP status 200, then `grpc-status` 0 (in the trailers, or in the
/// headers of a trailers-only answer), then one `RateLimitResponse` whose `overall_code` is OK
/// (allowed) or OVER_LIMIT (refused). A non-zero `grpc-status` is a `grpc N` error (16 without
/// the API key, 3 for a request the limiter refuses as invalid); an answer that is not a
/// well-formed gRPC reply is `malformed`.
pub fn outcome(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    trailers: Option<&HeaderMap>,
) -> Outcome {
    if status != StatusCode::OK {
        return Outcome::Error(ErrorKind::Status(status.as_u16()));
    }
    let grpc_status = headers
        .get("grpc-status")
        .or_else(|| trailers.and_then(|t| t.get("grpc-status")));
    let Some(code) = grpc_status
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
    else {
        return Outcome::Error(ErrorKind::Malformed);
    };
    if code != 0 {
        return Outcome::Error(ErrorKind::Grpc(code));
    }
    // One uncompressed message, exactly filling the body.
    let message = match body {
        [0, a, b, c, d, message @ ..]
            if u32::from_be_bytes([*a, *b, *c, *d]) as usize == message.len() =>
        {
            message
        }
        _ => return Outcome::Error(ErrorKind::Malformed),
    };
    match RateLimitResponse::decode(message).map(|r| Code::try_from(r.overall_code)) {
        Ok(Ok(Code::Ok)) => Outcome::Allowed,
        Ok(Ok(Code::OverLimit)) => Outcome::Rejected,
        _ => Outcome::Error(ErrorKind::Malformed),
    }
}

/// The HTTP/2 connections of a run: per target number, [`RlsCall::connections`] of them,
/// opened when first needed and again when one has closed (the server restarted).
#[derive(Debug)]
pub(crate) struct Connections {
    call: RlsCall,
    hits: u32,
    /// The frame every call sends, when no entry takes the request's key.
    fixed: Option<Bytes>,
    auth: Option<HeaderValue>,
    targets: Vec<OnceLock<Target>>,
}

#[derive(Debug)]
struct Target {
    uri: Uri,
    /// `host:port`, to connect to.
    addr: String,
    slots: Box<[Slot]>,
}

#[derive(Debug, Default)]
struct Slot {
    /// The open connection; read on every call, written when (re)connecting.
    live: RwLock<Option<SendRequest<Full<Bytes>>>>,
    /// Held while connecting, so that the calls waiting for this slot open one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn current(&self) -> Option<SendRequest<Full<Bytes>>> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    async fn sender(&self, addr: &str) -> Result<SendRequest<Full<Bytes>>, ErrorKind> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|_| ErrorKind::Connect)?;
        let _ = stream.set_nodelay(true);
        let (send, connection) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| ErrorKind::Connect)?;
        // Runs until the last sender is dropped (the end of the run) or the connection fails.
        tokio::spawn(connection);
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Some(send.clone());
        Ok(send)
    }
}

impl Connections {
    pub(crate) fn new(call: RlsCall, hits: u32, auth: Option<HeaderValue>) -> Connections {
        let fixed = (!call.varies()).then(|| call.frame("", hits));
        Connections {
            call,
            hits,
            fixed,
            auth,
            targets: (0..MAX_TARGETS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Whether the calls need the request's key.
    pub(crate) fn needs_key(&self) -> bool {
        self.fixed.is_none()
    }

    /// One call to target number `target` (base URL `base`) on its connection for `lane`.
    pub(crate) async fn call(&self, target: usize, base: &str, lane: u64, key: &str) -> Outcome {
        let t = self.targets[target].get_or_init(|| Target {
            uri: format!("{base}{PATH}")
                .parse()
                .expect("a validated base URL"),
            addr: base.trim_start_matches("http://").to_owned(),
            slots: (0..self.call.connections)
                .map(|_| Slot::default())
                .collect(),
        });
        let slot = &t.slots[(lane % t.slots.len() as u64) as usize];
        let mut send = match slot.sender(&t.addr).await {
            Ok(send) => send,
            Err(kind) => return Outcome::Error(kind),
        };
        let body = match &self.fixed {
            Some(frame) => frame.clone(),
            None => self.call.frame(key, self.hits),
        };
        let mut request = Request::post(t.uri.clone())
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers");
        if let Some(auth) = &self.auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let Ok(request) = request.body(Full::new(body)) else {
            return Outcome::Error(ErrorKind::Transport);
        };
        let Ok(response) = send.send_request(request).await else {
            return Outcome::Error(ErrorKind::Transport);
        };
        let (parts, mut body) = response.into_parts();
        let mut data = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Outcome::Error(ErrorKind::Transport);
            };
            match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        outcome(parts.status, &parts.headers, &data, trailers.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;

    fn grpc_ok() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers
    }

    fn framed(response: &RateLimitResponse) -> Vec<u8> {
        let message = response.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    fn answer(code: Code) -> Vec<u8> {
        framed(&RateLimitResponse {
            overall_code: code as i32,
            ..Default::default()
        })
    }

    fn headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers
    }

    #[test]
    fn ok_is_allowed_and_over_limit_is_refused() {
        let trailers = grpc_ok();
        assert_eq!(
            outcome(
                StatusCode::OK,
                &headers(),
                &answer(Code::Ok),
                Some(&trailers)
            ),
            Outcome::Allowed
        );
        assert_eq!(
            outcome(
                StatusCode::OK,
                &headers(),
                &answer(Code::OverLimit),
                Some(&trailers)
            ),
            Outcome::Rejected
        );
    }

    #[test]
    fn a_non_zero_grpc_status_is_an_error_whatever_the_body_says() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("3"));
        trailers.insert("grpc-message", HeaderValue::from_static("empty domain"));
        assert_eq!(
            outcome(
                StatusCode::OK,
                &headers(),
                &answer(Code::Ok),
                Some(&trailers)
            ),
            Outcome::Error(ErrorKind::Grpc(3))
        );
    }

    #[test]
    fn a_trailers_only_answer_is_read_from_the_headers() {
        // What tonic sends for an error: the status in the headers, no body, no trailers.
        let mut only = headers();
        only.insert("grpc-status", HeaderValue::from_static("16"));
        assert_eq!(
            outcome(StatusCode::OK, &only, &[], None),
            Outcome::Error(ErrorKind::Grpc(16))
        );
        // Trailers-only with status 0 but no message is not a decision.
        let mut empty_ok = headers();
        empty_ok.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(
            outcome(StatusCode::OK, &empty_ok, &[], None),
            Outcome::Error(ErrorKind::Malformed)
        );
    }

    #[test]
    fn answers_that_are_not_a_grpc_decision_are_errors() {
        let trailers = grpc_ok();
        // HTTP status first.
        assert_eq!(
            outcome(
                StatusCode::NOT_FOUND,
                &headers(),
                &answer(Code::Ok),
                Some(&trailers)
            ),
            Outcome::Error(ErrorKind::Status(404))
        );
        // No grpc-status at all (the stream ended without trailers).
        assert_eq!(
            outcome(StatusCode::OK, &headers(), &answer(Code::Ok), None),
            Outcome::Error(ErrorKind::Malformed)
        );
        // UNKNOWN overall code, a compressed flag, a short frame, a long frame.
        let unknown = answer(Code::Unknown);
        let mut compressed = answer(Code::Ok);
        compressed[0] = 1;
        let ok = answer(Code::Ok);
        let mut long = ok.clone();
        long.push(0);
        for body in [
            &unknown[..],
            &compressed,
            &ok[..ok.len() - 1],
            &long,
            &[0, 0],
        ] {
            assert_eq!(
                outcome(StatusCode::OK, &headers(), body, Some(&trailers)),
                Outcome::Error(ErrorKind::Malformed),
                "{body:?}"
            );
        }
    }

    #[test]
    fn descriptors_parse_and_encode_with_the_request_key_where_asked() {
        let mut call = RlsCall::new("edge");
        call.descriptors
            .push(RlsCall::parse_descriptor("client_id=bench").unwrap());
        call.descriptors
            .push(RlsCall::parse_descriptor(" api_key = a , path").unwrap());
        assert_eq!(
            call.descriptors[1],
            vec![
                Entry {
                    key: "api_key".into(),
                    value: Some("a".into())
                },
                Entry {
                    key: "path".into(),
                    value: None
                }
            ]
        );
        assert!(call.problems().is_empty());
        let frame = call.frame("key-7", 3);
        assert_eq!(frame[0], 0);
        assert_eq!(
            u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize,
            frame.len() - 5
        );
        let decoded = RateLimitRequest::decode(&frame[5..]).unwrap();
        assert_eq!(decoded.domain, "edge");
        assert_eq!(decoded.hits_addend, 3);
        assert_eq!(decoded.descriptors[0].entries[0].value, "bench");
        assert_eq!(decoded.descriptors[1].entries[1].key, "path");
        assert_eq!(decoded.descriptors[1].entries[1].value, "key-7");
        // One hit is the default, not sent.
        let one = RateLimitRequest::decode(&call.frame("k", 1)[5..]).unwrap();
        assert_eq!(one.hits_addend, 0);

        for bad in ["", "=x", "a=", "a=1,,b"] {
            assert!(RlsCall::parse_descriptor(bad).is_err(), "{bad}");
        }
        let mut empty = RlsCall::new(" ");
        empty.connections = 0;
        assert_eq!(empty.problems().len(), 3, "{:?}", empty.problems());
    }
}
