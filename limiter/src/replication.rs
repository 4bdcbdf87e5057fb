//! Delta-state replication between limiter replicas.
//!
//! Every sync interval (50 ms by default) a replica sends each peer the buckets its own
//! decisions changed since the last round ([`crate::store::Store::drain_changes`]), and a peer
//! that did not take a round gets its buckets again once it answers (`Missed`); every
//! anti-entropy interval it sends its whole state to each peer that may have missed deltas
//! (restart, partition, a dropped or partly refused request: [`PeerStatus::in_sync`]), so it
//! converges anyway, and a heartbeat to the others (the whole state every
//! [`WHOLE_STATE_EVERY`]-th round, whatever). Merging is the CRDT join, so duplicates,
//! reordering and replays are harmless; a replica restarted empty pulls every peer's state
//! (`GET /v1/state?from=SHARD`) before it reports ready.
//!
//! The whole state travels in pages, for a pull and for anti-entropy alike: whole shards of the
//! store, at least 16k buckets each (about 1.3 MB) unless the state ends first, each one signed
//! message, merged before the next is asked for; neither side holds more than a page.
//!
//! `strict` mode adds `POST /v1/lend`: a replica short of tokens for a request borrows them
//! from its peers' shares (docs/crdt.md, "Loans"); request and answer are signed, the answer
//! bound to the request's nonce.
//!
//! Peer traffic has its own listener (`OPENCLAW_PEER_LISTEN`) so a NetworkPolicy can keep it to
//! replicas. Every message is authenticated with HMAC-SHA256 under `OPENCLAW_PEER_SECRET` over
//! a timestamp and the body; its signature headers, which bind it to the replica it is for
//! (learned with `GET /v1/hello`), are checked before its body is read, bodies are bounded in
//! size and, before authentication, all together (one budget); a signed message is taken once,
//! at that replica only (replays and misdirected messages are refused); answers are signed and
//! name the request they answer.
//! Anything unauthenticated, malformed, oversized, replayed or of another protocol version is
//! refused, counted by reason, and never merged.
//!
//! With peer mutual TLS (`crate::peer_tls`) the listener serves HTTPS and requires a client
//! certificate from the peer CA, and this side dials `https://` with this replica's
//! certificate. The HMAC layer stays as it is: under the shared secret when one is set (both
//! checks then apply), else under [`MTLS_ONLY_KEY`], where it no longer authenticates (the
//! handshake does) but still binds answers to requests and refuses replays.
//!
//! The wire format (docs/crdt.md, "The wire format") is an entry per bucket, `[policy, key,
//! epoch, rebaser, [[replica, incarnation, consumed, absorbed], ...]]`, in one of three forms.
//! Version 2, JSON with replica ids and stamps whole (about 100 bytes an entry), is what
//! whole-state pages use, readable with curl when debugging a cluster, and what deltas to a peer
//! that announces nothing newer use. Version 3 ([`COMPACT_VERSION`]) refers to replicas by
//! index into the message's table and gives stamps as offsets from its `sent_at`: about half
//! that. Version 4 ([`BINARY_VERSION`]) is version 3 encoded with postcard: deltas to peers
//! whose `GET /v1/hello` announces it, almost half the bytes again, and no number formatted or
//! parsed (`scripts/bench-replication.py`: 53 bytes per decision to two peers, from 96 and 202).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use compact_str::CompactString;
use ring::hmac;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use tokio::sync::watch;

use crate::bucket::{Micros, Rate};
use crate::clock::{ClockAhead, OffsetUs, follow_peer};
use crate::crdt::{BucketState, Component, ReplicaId, UNLISTED};
use crate::escrow::protocol::{Control, Params};
use crate::escrow::share::{LoanAsk, capacity, cost_units, plan_pool};
use crate::escrow::{Escrow, Shortfall};
use crate::listener::ClientCertificate;
use crate::metrics::{DirectionLabels, PeerLabels, ReasonLabels, StateLabels};
use crate::node_binding::NodeBindings;
use crate::policy::{Mode, Policy};
use crate::service::Limiter;
use crate::store::{MergeBounds, MergeRefused, PolicyId};

/// Version of the peer protocol this build sends when it does not know the peer reads a
/// newer one ([`delta_version`]), and in every whole-state page. Version 2 can leave a
/// component unlisted by its bucket's claim (`absorbed` = `u64::MAX`); version 1 messages are
/// still read (module docs).
pub const PROTOCOL_VERSION: u32 = 2;
/// Version 3, the compact entry, sent as deltas to peers whose `GET /v1/hello` says they read
/// it: replica ids are indexes into the message's `replicas`, stamps are signed offsets from
/// its `sent_at`, and an unlisted component's `absorbed` is `null`. About half the bytes of a
/// version-2 entry (two 20-digit ids and two 16-digit stamps become a few digits each): half
/// the traffic between replicas (docs/benchmarks.md, section 10).
pub const COMPACT_VERSION: u32 = 3;
/// Version 4, the binary delta: what version 3 says, encoded with `postcard` (serde's data
/// model as varints and length prefixes) rather than JSON, sent as deltas to peers whose
/// `GET /v1/hello` says they read it. Almost half the bytes of version 3, and neither side
/// formats or parses a number (docs/benchmarks.md, section 10). Its first byte is the version
/// (`0x04`), never JSON's `{` or leading whitespace: that is how a body's form is told.
pub const BINARY_VERSION: u32 = 4;
/// The earlier version still read: written before claims could leave a component unlisted. A
/// component it sends with nothing absorbed and an incarnation before its claim was one the
/// claimant did not know, and is read as unlisted (as snapshots of format 2 are).
const PROTOCOL_VERSION_1: u32 = 1;
/// Largest peer message accepted or sent. Full-state transfers are split to stay under it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Buckets per full-state message (about 1 MB of JSON).
const FULL_SYNC_CHUNK: usize = 16_384;
/// Signed messages older or newer than this are refused (limits replays; merges are
/// idempotent, so a replay could not change state anyway).
const MAX_CLOCK_SKEW_US: Micros = 5 * 60 * 1_000_000;
const TIMESTAMP_HEADER: &str = "x-openclaw-timestamp";
const SIGNATURE_HEADER: &str = "x-openclaw-signature";
/// On a refused peer request: why (`Rejection::reason`), so that the sender can tell a refusal
/// of its clock from the others. Not signed: it only ever makes the sender hear less of the
/// refusing peer, as cutting the link would.
const REFUSAL_HEADER: &str = "x-openclaw-refusal";
/// [`Rejection::reason`] of a message stamped beyond the clock guard.
const CLOCK_AHEAD_REASON: &str = "clock_ahead";
/// HMAC of `head \n timestamp \n path \n content length \n body signature`: a request with a
/// body is authenticated by it before a byte of the body is read.
const HEAD_SIGNATURE_HEADER: &str = "x-openclaw-head-signature";
/// HMAC of `bound \n timestamp \n path \n content length \n body signature \n recipient`: the
/// head signature bound to the replica the request is for (its replica id, in
/// [`RECIPIENT_HEADER`]), so that a message taken off the wire to one replica is refused by
/// every other (`misdirected`). What replaces [`HEAD_SIGNATURE_HEADER`], which earlier versions
/// send and check.
const BOUND_SIGNATURE_HEADER: &str = "x-openclaw-bound-signature";
/// The replica id a request is for: learned from the peer's signed answer to
/// `GET /v1/hello`, and new at each of its process starts (`crdt::ReplicaId`).
const RECIPIENT_HEADER: &str = "x-openclaw-recipient";
/// What `GET /v1/hello` signs in place of a body. The one request bound to no recipient: it
/// asks the replica at an address who it is, and changes nothing.
const HELLO_PATH: &str = "GET /v1/hello";
/// The HMAC key of replicas that authenticate with mutual TLS alone (no `OPENCLAW_PEER_SECRET`).
/// Public, so it proves nothing about the sender: what the signatures still give is the
/// structure around them, answers bound to their request and replays refused.
pub const MTLS_ONLY_KEY: &[u8] = b"openclaw peer mTLS without OPENCLAW_PEER_SECRET";

#[derive(Debug, Clone)]
pub struct ReplicationOptions {
    /// HMAC key shared by every replica ([`MTLS_ONLY_KEY`] with mutual TLS and no secret).
    pub secret: Vec<u8>,
    /// Peer mutual TLS: dial `https://` presenting this replica's certificate.
    pub tls: Option<Arc<crate::peer_tls::PeerTls>>,
    pub sync_interval: Duration,
    pub anti_entropy_interval: Duration,
    /// Bound on one request to a peer.
    pub request_timeout: Duration,
    /// Leases and fairness of `strict` mode's escrow.
    pub strict: Params,
    /// Peers ahead of this replica's clock by up to this much pull it forward; further ahead,
    /// their timestamps are refused (`clock::follow_peer`).
    pub clock_guard: Duration,
    /// Bound on one `strict` loan request: a request waits this long at most per peer asked.
    pub loan_timeout: Duration,
    /// Bytes of peer request bodies held at once, across all requests, before they are
    /// authenticated ([`UNVERIFIED_BUDGET`] by default).
    pub unverified_budget: usize,
    /// Also take requests signed the way earlier versions sign them (without a head signature,
    /// so their bodies are read before anything in them is authenticated; or with a head bound
    /// to no recipient), and send them the unbound head they check. Only for a rolling upgrade
    /// from such a version (`OPENCLAW_PEER_LEGACY_SIGNATURES`).
    pub legacy_signatures: bool,
    /// Beyond this many buckets held, no new bucket is taken from peers (buckets held still
    /// merge; this replica's own clients still get one): [`DEFAULT_MAX_BUCKETS`] by default,
    /// `OPENCLAW_MAX_BUCKETS`.
    pub max_buckets: usize,
    /// Requests this replica has in flight to one peer at most (syncs, loans, state pages and
    /// hellos together; more wait their turn): half the peer listener's per-source connection
    /// cap (`OPENCLAW_PEER_MAX_CONNECTIONS_PER_SOURCE`), so that a fleet with one setting never
    /// has its requests closed unread by that cap.
    pub max_requests_per_peer: usize,
    /// Most buckets remembered, over all peers together, as sent in delta rounds a peer did not
    /// take, to send again once it answers: [`DEFAULT_MAX_MISSED`] (not configurable; an
    /// option so that tests can reach it).
    pub max_missed: usize,
}

/// The default of `OPENCLAW_MAX_BUCKETS`. A bucket costs about 115 bytes, more when several
/// replicas spend on it (32 bytes a component): 2M of them stay around 250-400 MB, inside the
/// deployed 512 MiB memory limit. Without a bound, a peer holding the secret could make a
/// replica hold any number of plausible buckets, hundreds of thousands per 16 MiB message.
pub const DEFAULT_MAX_BUCKETS: usize = 2_000_000;

/// What peer request bodies may hold at once before their signatures are checked: four
/// messages of the largest size.
pub const UNVERIFIED_BUDGET: usize = 4 * MAX_MESSAGE_BYTES;
/// An in-sync peer is still sent the whole state every this many anti-entropy rounds (once a
/// minute at the default 5 s): a safety net under the rule that it missed nothing, at a
/// twelfth of the cost of resending every round.
pub const WHOLE_STATE_EVERY: u32 = 12;
/// Most buckets remembered, over all peers together, as sent in delta rounds a peer did not
/// take ([`Replicator::push_changes`]): a few megabytes. Beyond that (peers unreachable while
/// that many buckets changed) the rest are not remembered, and the whole-state round, which a
/// peer that missed a message gets anyway, carries them.
pub const DEFAULT_MAX_MISSED: usize = 200_000;
/// Nodes tracked only because they sent messages (not from discovery): each is a label value of
/// the per-peer series, so their number is bounded.
const MAX_HEARD_ONLY_PEERS: usize = 64;
/// A node only heard from (not discovered) is reported in the per-peer series while it was
/// heard within this many anti-entropy intervals (it pushes everything at least once each).
const HEARD_ONLY_ROUNDS: u32 = 3;
/// Longest node name a message may carry (a DNS name's bound).
const MAX_NODE_NAME_BYTES: usize = 253;
/// Most components a peer's bucket entry may carry, and a bucket may hold after merging it. A
/// real bucket holds one per replica that spent on it in its current stretch of non-fullness,
/// and a little more across restarts; an entry with more, or whose merge would leave more, is
/// refused (`openclaw_peer_entries_refused_total{reason="too_many_components"}`).
pub const MAX_COMPONENTS_PER_BUCKET: usize = 64;
/// Longest a peer may take to send one request body.
const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// Why an unbound request is refused outside legacy mode.
const MISSING_BOUND: &str = "missing recipient-bound signature (a replica of an earlier version? \
                             see OPENCLAW_PEER_LEGACY_SIGNATURES)";
/// Largest answer to `GET /v1/hello`.
const MAX_HELLO_BYTES: usize = 4096;
/// Largest `POST /v1/lend` body.
const MAX_LEND_BYTES: usize = 16 * 1024;
/// Largest answer to `POST /v1/lend` read.
const MAX_LEND_ANSWER_BYTES: usize = 4096;

/// One message between replicas: the changed buckets (or all of them). Keys are borrowed from
/// the buckets being sent, and from the body being read when they need no unescaping: one
/// message carries thousands of entries, and copying each key twice showed in the profile.
#[derive(Debug, Deserialize)]
struct SyncMessage<'a> {
    v: u32,
    node: String,
    replica: u64,
    sent_at: Micros,
    /// True for anti-entropy and state pulls: the sender's whole state (possibly one chunk).
    /// Required on the wire, and merged like any other message: a receiver does not act on it.
    #[allow(dead_code)]
    full: bool,
    /// Policy names; entries refer to them by index.
    policies: Vec<String>,
    #[serde(borrow)]
    entries: Vec<WireEntry<'a>>,
    /// Escrow control state (`strict` mode), when the sender has a strict policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    escrow: Option<Control>,
    /// Version 3: the replica ids its entries refer to by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    replicas: Vec<u64>,
}

/// `[policy index, key, epoch, rebaser, [[replica, incarnation, consumed, absorbed], ...]]`.
/// Versions 1 and 2: replica ids and stamps as they are, `absorbed` `u64::MAX` for a component
/// the claim does not list. Version 3 ([`COMPACT_VERSION`]): replica ids as indexes into the
/// message's `replicas`, stamps as offsets from its `sent_at`, `absorbed` `null` when unlisted.
#[derive(Debug, Serialize, Deserialize)]
struct WireEntry<'a>(
    u32,
    #[serde(borrow)] Cow<'a, str>,
    i128,
    u64,
    WireComponents,
);

/// The components of a [`WireEntry`]. Read with room reserved for at most
/// [`MAX_COMPONENTS_PER_BUCKET`] of them whatever length the message declares: a binary
/// message ([`BINARY_VERSION`]) states each length before its items, and smallvec's own reader
/// reserves all of a declared length before reading an item. postcard already refuses to
/// declare more items than bytes are left, which still allows millions in a 16 MiB body.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
struct WireComponents(SmallVec<[WireComponent; 2]>);

impl std::ops::Deref for WireComponents {
    type Target = [WireComponent];

    fn deref(&self) -> &[WireComponent] {
        &self.0
    }
}

impl FromIterator<WireComponent> for WireComponents {
    fn from_iter<I: IntoIterator<Item = WireComponent>>(items: I) -> Self {
        Self(items.into_iter().collect())
    }
}

impl<'de> Deserialize<'de> for WireComponents {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Components;
        impl<'de> serde::de::Visitor<'de> for Components {
            type Value = WireComponents;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of [replica, incarnation, consumed, absorbed]")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<WireComponents, A::Error> {
                let mut components = SmallVec::new();
                let declared = seq.size_hint().unwrap_or(0);
                components.reserve(declared.min(MAX_COMPONENTS_PER_BUCKET + 1));
                while let Some(component) = seq.next_element()? {
                    components.push(component);
                }
                Ok(WireComponents(components))
            }
        }
        deserializer.deserialize_seq(Components)
    }
}

/// `[replica, incarnation, consumed, absorbed]` of a [`WireEntry`].
type WireComponent = (u64, i128, u64, Option<u64>);

/// A [`SyncMessage`] on its way out: the same fields, its entries written from the buckets
/// they are read from ([`EntriesOut`]).
#[derive(Serialize)]
struct SyncMessageOut<'a> {
    v: u32,
    node: &'a str,
    replica: u64,
    sent_at: Micros,
    full: bool,
    policies: &'a [String],
    entries: EntriesOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    escrow: Option<&'a Control>,
    #[serde(skip_serializing_if = "<[u64]>::is_empty")]
    replicas: &'a [u64],
}

/// A [`SyncMessage`] in [`BINARY_VERSION`] on its way out: every field always written (a
/// binary form has no field names to leave one out by), the escrow state as its JSON text.
#[derive(Serialize)]
struct BinaryMessageOut<'a, E> {
    v: u32,
    node: &'a str,
    replica: u64,
    sent_at: Micros,
    full: bool,
    policies: &'a [String],
    /// [`EntriesOut`], or entries already read ([`binary_from_json`]): the same sequence.
    entries: E,
    escrow: Option<&'a str>,
    replicas: &'a [u64],
}

/// A [`BINARY_VERSION`] message as read, before its escrow state is parsed
/// ([`decode_binary`]).
#[derive(Deserialize)]
struct BinaryMessage<'a> {
    v: u32,
    node: String,
    replica: u64,
    sent_at: Micros,
    full: bool,
    policies: Vec<String>,
    #[serde(borrow)]
    entries: Vec<WireEntry<'a>>,
    /// The escrow control state as JSON: it is small, sent only while a policy is `strict`,
    /// and its serde form leaves absent fields out, which only a self-describing form reads.
    #[serde(borrow)]
    escrow: Option<Cow<'a, str>>,
    replicas: Vec<u64>,
}

/// Whether a peer message body is in [`BINARY_VERSION`]'s form: JSON starts with `{` or
/// whitespace, a binary message with its version.
fn is_binary(body: &[u8]) -> bool {
    !matches!(body.first(), Some(b'{' | b' ' | b'\t' | b'\n' | b'\r'))
}

/// Read a [`BINARY_VERSION`] body: all of it, nothing after the message.
fn decode_binary(body: &[u8]) -> Result<SyncMessage<'_>, Rejection> {
    let (message, rest) = postcard::take_from_bytes::<BinaryMessage>(body)
        .map_err(|e| Rejection::Malformed(format!("binary message: {e}")))?;
    if message.v != BINARY_VERSION {
        return Err(Rejection::Incompatible(message.v));
    }
    if !rest.is_empty() {
        return Err(Rejection::Malformed(format!(
            "{} bytes after the binary message",
            rest.len()
        )));
    }
    let escrow = match message.escrow {
        Some(text) => Some(
            serde_json::from_str(&text)
                .map_err(|e| Rejection::Malformed(format!("escrow: {e}")))?,
        ),
        None => None,
    };
    Ok(SyncMessage {
        v: message.v,
        node: message.node,
        replica: message.replica,
        sent_at: message.sent_at,
        full: message.full,
        policies: message.policies,
        entries: message.entries,
        escrow,
        replicas: message.replicas,
    })
}

/// A JSON message (versions 1 to 3) re-encoded in [`BINARY_VERSION`], its entries as they are:
/// a version-3 message keeps its meaning, an earlier one's ids and stamps are read as a
/// version-3 message's would be. For the hostile-peer tests and the fuzz target, which build
/// binary messages from their JSON ones.
#[doc(hidden)]
pub fn binary_from_json(json: &[u8]) -> Result<Vec<u8>, String> {
    let message: SyncMessage = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let escrow = message.escrow.as_ref().map(escrow_json);
    postcard::to_stdvec(&BinaryMessageOut {
        v: BINARY_VERSION,
        node: &message.node,
        replica: message.replica,
        sent_at: message.sent_at,
        full: message.full,
        policies: &message.policies,
        entries: &message.entries,
        escrow: escrow.as_deref(),
        replicas: &message.replicas,
    })
    .map_err(|e| e.to_string())
}

/// The escrow state as a [`BINARY_VERSION`] message carries it: its JSON text.
fn escrow_json(control: &Control) -> String {
    serde_json::to_string(control).expect("serializing plain data cannot fail")
}

/// The version of the deltas sent to a peer whose `GET /v1/hello` announced `reads` (0 before
/// it answered): the newest both sides read.
fn delta_version(reads: u32) -> u32 {
    match reads {
        r if r >= BINARY_VERSION => BINARY_VERSION,
        COMPACT_VERSION => COMPACT_VERSION,
        _ => PROTOCOL_VERSION,
    }
}

/// How a message writes ids and stamps: whole (versions 1 and 2), or as indexes into its
/// `replicas` and offsets from its `sent_at` ([`COMPACT_VERSION`]).
struct WireForm<'a> {
    compact: bool,
    sent_at: Micros,
    /// Compact: each replica id's index in the message's `replicas`.
    replica_index: &'a BTreeMap<u64, u64>,
}

impl WireForm<'_> {
    fn replica(&self, id: u64) -> u64 {
        if !self.compact {
            return id;
        }
        self.replica_index[&id]
    }

    fn stamp(&self, at: Micros) -> i128 {
        if self.compact {
            i128::from(at) - i128::from(self.sent_at)
        } else {
            i128::from(at)
        }
    }

    fn absorbed(&self, absorbed: u64) -> Option<u64> {
        (!self.compact || absorbed != UNLISTED).then_some(absorbed)
    }

    fn entry<'k>(&self, policy_index: u32, key: &'k str, state: &BucketState) -> WireEntry<'k> {
        let components = state
            .components()
            .iter()
            .map(|c| {
                (
                    self.replica(c.replica.0),
                    self.stamp(c.incarnation),
                    c.consumed,
                    self.absorbed(c.absorbed),
                )
            })
            .collect();
        WireEntry(
            policy_index,
            Cow::Borrowed(key),
            self.stamp(state.epoch()),
            self.replica(state.rebaser().0),
            components,
        )
    }
}

/// The entries of a [`SyncMessageOut`]: each bucket of a policy still in force, in order.
struct EntriesOut<'a> {
    buckets: &'a [HeldBucket],
    /// Per bucket: its policy's index in the message, `None` to leave it out.
    policy_index: &'a [Option<u32>],
    form: &'a WireForm<'a>,
}

impl Serialize for EntriesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let sent = self.policy_index.iter().flatten().count();
        let mut seq = serializer.serialize_seq(Some(sent))?;
        for ((_, key, state), index) in self.buckets.iter().zip(self.policy_index) {
            if let Some(index) = index {
                seq.serialize_element(&self.form.entry(*index, key, state))?;
            }
        }
        seq.end()
    }
}

/// A bucket as held, on its way to the wire: policy, key, state. Keys of up to 24 bytes are
/// stored inline (`CompactString`), so collecting a round's changes allocates no key.
type HeldBucket = (PolicyId, CompactString, BucketState);

/// A component as read off the wire: `(replica, incarnation, consumed, absorbed)`.
type ReadComponents = SmallVec<[(u64, Micros, u64, u64); 2]>;

/// What [`WireEntry`] and [`WireComponent`] say, in any version, as the CRDT's values; `None`
/// for an entry no honest encoder writes (an index out of the table, a stamp out of range, a
/// `null` before version 3). Checked for every entry before anything merges.
struct EntryReader<'a> {
    compact: bool,
    sent_at: Micros,
    replicas: &'a [u64],
}

impl EntryReader<'_> {
    fn stamp(&self, raw: i128) -> Option<Micros> {
        let at = if self.compact {
            i128::from(self.sent_at).checked_add(raw)?
        } else {
            raw
        };
        Micros::try_from(at).ok()
    }

    fn replica(&self, raw: u64) -> Option<u64> {
        if self.compact {
            self.replicas.get(usize::try_from(raw).ok()?).copied()
        } else {
            Some(raw)
        }
    }

    fn absorbed(&self, raw: Option<u64>) -> Option<u64> {
        match raw {
            Some(absorbed) => Some(absorbed),
            None if self.compact => Some(UNLISTED),
            None => None,
        }
    }

    /// Whether [`EntryReader::read`] can read the entry (without building what it reads).
    fn readable(&self, entry: &WireEntry<'_>) -> bool {
        let WireEntry(_, _, epoch, rebaser, components) = entry;
        self.stamp(*epoch).is_some()
            && self.replica(*rebaser).is_some()
            && components
                .iter()
                .all(|&(replica, incarnation, _, absorbed)| {
                    self.replica(replica).is_some()
                        && self.stamp(incarnation).is_some()
                        && self.absorbed(absorbed).is_some()
                })
    }

    /// The entry's epoch, rebaser and components.
    fn read(&self, entry: &WireEntry<'_>) -> Option<(Micros, u64, ReadComponents)> {
        let WireEntry(_, _, epoch, rebaser, components) = entry;
        let components = components
            .iter()
            .map(|&(replica, incarnation, consumed, absorbed)| {
                Some((
                    self.replica(replica)?,
                    self.stamp(incarnation)?,
                    consumed,
                    self.absorbed(absorbed)?,
                ))
            })
            .collect::<Option<ReadComponents>>()?;
        Some((self.stamp(*epoch)?, self.replica(*rebaser)?, components))
    }
}

/// What merging one message did.
#[derive(Debug, Clone, Copy)]
struct Applied {
    /// Buckets it changed.
    changed: usize,
    /// Every entry in it was taken: none refused (clock guard, implausible, store full) and
    /// none of a policy this replica does not have. A peer sent only complete messages since
    /// its last whole-state round missed nothing (`PeerStatus::in_sync`).
    complete: bool,
}

/// A peer's answer to `POST /v1/sync`.
#[derive(Debug, Serialize, Deserialize)]
struct SyncAnswer {
    node: String,
    merged: usize,
    /// It took every entry of the message ([`Applied::complete`]); earlier versions do not
    /// say, and are sent the whole state every anti-entropy round.
    #[serde(default)]
    complete: bool,
    /// The answering replica: a `strict` lease counts answers by replica.
    #[serde(default)]
    replica: Option<u64>,
    /// Its escrow control state, merged by the sender before it counts the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    escrow: Option<Control>,
    /// The signature of the request answered: a signed answer counts for that request only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    re: Option<String>,
    /// The answering replica's clock when it answered (µs since the UNIX epoch): an answer
    /// from beyond the clock guard is not taken, as that replica's messages are not. Earlier
    /// versions do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent_at: Option<Micros>,
}

/// `POST /v1/lend`: a replica short of tokens for one `strict` request asks a peer for some
/// of its sub-bucket (docs/crdt.md, "strict mode", loans). Units are the sub-bucket's
/// (`escrow::share::cost_units`), so both sides check they mean the same rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LendRequest {
    v: u32,
    /// The borrower.
    replica: u64,
    /// Echoed in the signed answer: an answer is good for this request only.
    nonce: u64,
    policy: String,
    key: String,
    capacity: u64,
    interval_ms: u64,
    wanted: i128,
    /// Lend the whole level when it is below `wanted` (the borrower pools several loans).
    partial: bool,
    /// The borrower's capacity: a lender that holds `wanted` lends as much more as leaves
    /// both equally full (`SubBucket::lend`).
    #[serde(default)]
    room: i128,
    /// What the borrower's sub-bucket keeps once its request is paid.
    #[serde(default)]
    kept: i128,
    /// Not a loan: units the sender gives this replica's sub-bucket (its part of what the
    /// sender was lent while evening out a group: `Replicator::even_out`).
    #[serde(default)]
    give: i128,
}

/// The answer to `GET /v1/hello`, signed: who answers at the address asked.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    node: String,
    replica: u64,
    /// The newest protocol version it reads.
    #[serde(default)]
    v: u32,
    /// The signature of the request answered.
    re: String,
}

/// The lender's signed answer.
#[derive(Debug, Serialize, Deserialize)]
struct LendAnswer {
    replica: u64,
    nonce: u64,
    lent: i128,
    /// Its sub-bucket's level before lending.
    level: i128,
    /// Units it lent to even out this key within the time an evening out can take
    /// ([`Replicator::in_transit`]): perhaps in nobody's sub-bucket yet, so not in any level.
    /// A borrower counts them as held before it concludes the cluster is dry. Absent from
    /// replicas before it (0).
    #[serde(default, skip_serializing_if = "is_zero")]
    in_transit: i128,
}

fn is_zero(units: &i128) -> bool {
    *units == 0
}

/// Version of the loan messages.
const LEND_VERSION: u32 = 1;

/// What the peers lent for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loan {
    pub lent: i128,
    /// When every other member of the allocation answered: the most all of them held (their
    /// levels before lending, what they lent included), with what this replica and they lent
    /// to even out and may still be in transit (`Replicator::in_transit`).
    pub peers_held: Option<i128>,
    /// Whom to even out with once the request is paid ([`Replicator::even_out`]).
    pub even_out: Option<EvenOut>,
}

/// A peer: replica id and address.
type Peer = (u64, String);

/// After a loan one peer paid: that peer (with its capacity and what it kept), and the peers
/// not asked (with their capacities).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvenOut {
    lender: (Peer, i128, i128),
    rest: Vec<(Peer, i128)>,
}

/// What this replica knows about one peer it sends to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerStatus {
    pub address: String,
    /// The peer's node id, once it has answered.
    pub node: Option<String>,
    /// Its replica id (the CRDT's and the escrow's), once it has answered.
    pub replica: Option<u64>,
    pub up: bool,
    /// Wall-clock µs of the last successful exchange with it.
    pub last_contact_us: Option<Micros>,
    /// Wall-clock µs of the last merge of state it sent us.
    pub last_merge_us: Option<Micros>,
    pub last_error: Option<String>,
    /// The peer's clock minus this replica's system clock, from its last message (µs; reads low
    /// by the network delay).
    pub clock_offset_us: Option<i64>,
    /// When `clock_offset_us` was seen (messages refused for their clock included).
    #[serde(skip)]
    pub clock_offset_seen: Option<std::time::Instant>,
    /// Its last message, or some of its entries, were refused by the clock guard.
    pub clock_refused: bool,
    /// Its last answer was not taken: sent from beyond the clock guard.
    pub answer_clock_refused: bool,
    /// It refused this replica's last message as stamped beyond its clock guard (its clock is
    /// that far behind ours, or ours that far ahead of everyone's).
    pub refuses_our_clock: bool,
    pub messages_sent: u64,
    pub messages_received: u64,
    /// It took every message sent to it whole since its last whole-state round (same process,
    /// every delta delivered, answered signed and complete): anti-entropy sends it a heartbeat
    /// rather than the whole state, but for every [`WHOLE_STATE_EVERY`]-th round.
    pub in_sync: bool,
    /// Anti-entropy rounds since it was last sent the whole state.
    #[serde(skip)]
    rounds_since_whole: u32,
    /// The newest peer protocol version its `GET /v1/hello` said it reads (0 until it
    /// answers). Deltas go to it in the newest version both read: 4 (binary) from a replica of
    /// this version, 3 or 2 to a peer of an earlier one, as during a rolling upgrade.
    pub reads_version: u32,
}

impl PeerStatus {
    /// The clock guard stands between this peer and this replica, one way or the other: it
    /// refuses our messages for our clock, or we do not take its answers for its clock.
    pub fn clock_separated(&self) -> bool {
        self.refuses_our_clock || self.answer_clock_refused
    }
}

/// [`Replicator::clock_separation`].
#[derive(Debug, Default)]
struct ClockSeparation {
    /// This replica and the peers not separated from it are a strict majority of the members
    /// discovery lists.
    in_majority: bool,
    /// Every peer discovery lists that is not separated is up.
    rest_up: bool,
}

/// Replication state shared by the peer listener and the sender loop.
#[derive(Debug)]
pub struct Replicator {
    limiter: Arc<Limiter>,
    options: ReplicationOptions,
    key: hmac::Key,
    client: reqwest::Client,
    /// `http` or, with mutual TLS, `https`.
    scheme: &'static str,
    /// Peers by address (from discovery), plus nodes we only heard from (by `node:<id>`).
    peers: Mutex<BTreeMap<String, PeerStatus>>,
    escrow: Arc<Escrow>,
    /// Background evenings out still running ([`Replicator::even_out`]).
    evening_out: Arc<std::sync::atomic::AtomicUsize>,
    /// Units this replica lent to peers' evenings out, by policy and key, with when it last
    /// did ([`Replicator::in_transit`]).
    lent_to_even_out: Mutex<HashMap<(String, String), (tokio::time::Instant, i128)>>,
    /// One permit per byte of request body held before authentication.
    unverified: Arc<tokio::sync::Semaphore>,
    /// Compares signatures in constant time (HMACs of both under this key).
    compare_key: hmac::Key,
    /// Signed requests already taken, by (timestamp, signature), while their timestamp is fresh.
    seen: Mutex<BTreeSet<(Micros, Vec<u8>)>>,
    /// When a store-full refusal was last logged (at most once a minute).
    store_full_logged: Mutex<Option<std::time::Instant>>,
    /// Per peer address, a permit per request in flight to it
    /// ([`ReplicationOptions::max_requests_per_peer`]).
    in_flight: Mutex<BTreeMap<String, Arc<tokio::sync::Semaphore>>>,
    /// Per peer address, the buckets of delta rounds it did not take ([`Missed`]).
    missed: Mutex<HashMap<SocketAddr, Missed>>,
    /// With nodes bound (`OPENCLAW_PEER_TLS_BIND_NODE`): the node each replica id was first
    /// heard from over a certificate naming it.
    bindings: Mutex<NodeBindings>,
    /// The runtime this replicator was made on (the process' main one), where its peer
    /// connections and background tasks live, even when a request on another runtime (a gRPC
    /// worker's, `rls::grpc`) borrows; `None` if made outside one.
    home: Option<tokio::runtime::Handle>,
}

/// Why a peer did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undelivered {
    /// Not reached: a connection refused or reset, a timeout.
    Unreachable,
    /// It answered with an error status: it refuses the message itself.
    Refused,
}

/// Buckets a peer did not take in delta rounds since it last took one. They go to it again,
/// as they are then, with the first round after it answers again: without this, a change sent
/// while a link was down reached that peer only with the next whole-state round (5 s by
/// default), and meanwhile it decided without it.
#[derive(Debug, Default)]
struct Missed {
    buckets: HashSet<(PolicyId, CompactString)>,
    /// The last round did not reach it: send it only the round's own changes (which probe the
    /// link) until one gets through, then the backlog.
    unreachable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot build the peer HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("the system random source failed")]
    Random,
    #[error("peer TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl Replicator {
    pub fn try_new(
        limiter: Arc<Limiter>,
        options: ReplicationOptions,
    ) -> Result<Self, ReplicationError> {
        let mut client = reqwest::Client::builder()
            .no_proxy()
            .timeout(options.request_timeout)
            .connect_timeout(options.request_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(options.max_requests_per_peer);
        let mut scheme = "http";
        if let Some(tls) = &options.tls {
            // One configuration for the client's life: its certificate and CA follow the files
            // (`PeerTls` swaps what it resolves and verifies against for new connections).
            client = client
                .tls_backend_preconfigured(tls.client_config()?)
                // The certificate an answer came over, to check the node it names.
                .tls_info(tls.binds_nodes());
            scheme = "https";
        }
        let client = client.build()?;
        let unverified_budget = options.unverified_budget;
        let escrow = Arc::new(Escrow::new(
            limiter.store().replica(),
            options.strict,
            limiter.clock(),
        ));
        limiter.enable_escrow(escrow.clone());
        Ok(Self {
            escrow,
            key: hmac::Key::new(hmac::HMAC_SHA256, &options.secret),
            limiter,
            options,
            client,
            scheme,
            peers: Mutex::default(),
            evening_out: Arc::default(),
            lent_to_even_out: Mutex::default(),
            unverified: Arc::new(tokio::sync::Semaphore::new(unverified_budget)),
            compare_key: hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
                .map_err(|_| ReplicationError::Random)?,
            seen: Mutex::default(),
            store_full_logged: Mutex::default(),
            in_flight: Mutex::default(),
            missed: Mutex::default(),
            bindings: Mutex::default(),
            home: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Spawns `task` on this replicator's runtime (see `home`), else on the current one.
    fn spawn_at_home<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.home {
            Some(home) => home.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// [`Replicator::borrow`] run on this replicator's runtime, for a request served on
    /// another one (a gRPC worker's): the peer connections, their timers and the evening out
    /// that follows stay where the replicator's other work runs, not on a runtime that ends
    /// with its listener. If that runtime is gone (shutdown), nothing is lent.
    ///
    /// The loan completes even if the request goes away meanwhile (Envoy gave up on the call:
    /// its `timeout`): what was lent is then settled as a refused request's loan is
    /// ([`Limiter::settle_loan`]: kept in this replica's sub-bucket, up to its capacity), not
    /// dropped with the request.
    pub async fn borrow_at_home(
        self: &Arc<Self>,
        policy: &str,
        key: &str,
        rate: Rate,
        shortfall: Shortfall,
    ) -> Loan {
        let (replicator, policy, key) = (self.clone(), policy.to_owned(), key.to_owned());
        let (limiter, settled_policy, settled_key) =
            (self.limiter.clone(), policy.clone(), key.clone());
        self.run_at_home(
            async move { replicator.borrow(&policy, &key, rate, shortfall).await },
            move |loan: Loan| {
                if loan.lent > 0 {
                    limiter.settle_loan(
                        &settled_policy,
                        &settled_key,
                        shortfall,
                        loan,
                        false,
                        false,
                    );
                }
            },
        )
        .await
        .unwrap_or_default()
    }

    /// Runs `task` on this replicator's runtime and returns its output, or `None` if that
    /// runtime dropped it. If the caller stops waiting (its future is dropped), the output goes
    /// to `unclaimed` instead, whether it was ready before the caller went away or after.
    async fn run_at_home<T, F>(
        &self,
        task: impl std::future::Future<Output = T> + Send + 'static,
        unclaimed: F,
    ) -> Option<T>
    where
        T: Send + 'static,
        F: Fn(T) + Send + Sync + 'static,
    {
        /// The caller's end: dropped with an answer sent and not read, it hands it on.
        struct Waiting<T, F: Fn(T)> {
            answer: tokio::sync::oneshot::Receiver<T>,
            unclaimed: Arc<F>,
        }
        impl<T, F: Fn(T)> Drop for Waiting<T, F> {
            fn drop(&mut self) {
                self.answer.close();
                if let Ok(output) = self.answer.try_recv() {
                    (self.unclaimed)(output);
                }
            }
        }
        let unclaimed = Arc::new(unclaimed);
        let (send, answer) = tokio::sync::oneshot::channel();
        let mut waiting = Waiting {
            answer,
            unclaimed: unclaimed.clone(),
        };
        self.spawn_at_home(async move {
            if let Err(output) = send.send(task.await) {
                unclaimed(output);
            }
        });
        (&mut waiting.answer).await.ok()
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    pub fn escrow(&self) -> &Arc<Escrow> {
        &self.escrow
    }

    /// Escrow state travels only while some policy is `strict`.
    fn strict_active(&self) -> bool {
        self.limiter.has_strict_policies()
    }

    fn escrow_control(&self) -> Option<Control> {
        self.strict_active().then(|| self.escrow.control())
    }

    /// Advance the escrow protocol. The first allocation waits until this replica is ready and
    /// every peer discovery lists has answered, but for the peers it is separated from by the
    /// clock guard ([`Replicator::clock_separation`]) when the rest make a majority with it.
    fn escrow_tick(&self) {
        let separation = self.clock_separation();
        let all_answered = self.limiter.is_ready() && separation.in_majority && separation.rest_up;
        self.escrow.tick(&self.limiter.policies(), all_answered);
    }

    /// The peers this replica cannot share a timeline with: they refuse its messages as stamped
    /// beyond their clock guard, or it does not take their answers for the same reason
    /// (docs/crdt.md, "Clocks"). Neither side can tell which clock is wrong; the majority can.
    /// With the rest of the membership a strict majority, this replica goes on without them
    /// (they do not hold up its first allocation, and it does not hear them in the escrow
    /// protocol, so their shares go to the others once their leases have run out); without, it
    /// is the odd one out and makes no first allocation (it never allocates alone what the
    /// majority allocates among itself).
    fn clock_separation(&self) -> ClockSeparation {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let (mut members, mut separated, mut rest_up) = (1usize, 0usize, true);
        for peer in peers.values().filter(|p| !p.address.starts_with("node:")) {
            members += 1;
            if peer.clock_separated() {
                separated += 1;
            } else {
                rest_up &= peer.up;
            }
        }
        ClockSeparation {
            in_majority: (members - separated) * 2 > members,
            rest_up,
        }
    }

    /// Whether `replica` refuses this replica's messages for its clock: it is not heard from
    /// in the escrow protocol, although its bucket state is merged.
    fn refuses_our_clock(&self, replica: u64) -> bool {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|p| p.refuses_our_clock && p.replica == Some(replica))
    }

    /// How many buckets this replica remembers as sent to peers that did not take them, over
    /// all peers (at most [`ReplicationOptions::max_missed`]). For tests.
    #[doc(hidden)]
    pub fn missed_buckets(&self) -> usize {
        let missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
        missed.values().map(|m| m.buckets.len()).sum()
    }

    /// Peers and what this replica knows of them, for `/status`.
    pub fn peer_statuses(&self) -> Vec<PeerStatus> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn with_peer<T>(&self, address: &str, update: impl FnOnce(&mut PeerStatus) -> T) -> T {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        // Nodes only heard from are named by what they say: keep at most so many (their
        // names become metric labels), forgetting the one heard from longest ago.
        if address.starts_with("node:") && !peers.contains_key(address) {
            let heard_only = || peers.keys().filter(|a| a.starts_with("node:"));
            if heard_only().count() >= MAX_HEARD_ONLY_PEERS
                && let Some(oldest) = heard_only()
                    .min_by_key(|a| peers[*a].last_contact_us.unwrap_or(0))
                    .cloned()
            {
                peers.remove(&oldest);
            }
        }
        let peer = peers
            .entry(address.to_owned())
            .or_insert_with(|| PeerStatus {
                address: address.to_owned(),
                ..PeerStatus::default()
            });
        update(peer)
    }

    /// Keep status entries for exactly the peers discovery reports (and the inbound-only ones).
    fn set_peers(&self, addresses: &[SocketAddr]) {
        let wanted: Vec<String> = addresses.iter().map(SocketAddr::to_string).collect();
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|address, _| wanted.contains(address));
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|address, _| address.starts_with("node:") || wanted.contains(address));
        for address in wanted {
            peers.entry(address.clone()).or_insert_with(|| PeerStatus {
                address,
                ..PeerStatus::default()
            });
        }
    }

    /// The lender's side of `POST /v1/lend`.
    fn lend_for(&self, request: &LendRequest) -> LendAnswer {
        let me = self.limiter.store().replica().0;
        let policies = self.limiter.policies();
        let (lent, level) = match policies.get(&request.policy) {
            Some(policy) if policy.mode == Mode::Strict => {
                let rate = policy.rate_for(&request.key);
                let whole = cost_units(rate, rate.capacity());
                let same_rate = rate.capacity() == request.capacity
                    && rate.interval_ms() == request.interval_ms;
                if same_rate && request.give > 0 {
                    self.escrow.take_balance(
                        policy.id,
                        &policy.name,
                        &request.key,
                        rate,
                        request.give.min(whole),
                    );
                    (0, 0)
                } else if same_rate && request.wanted <= whole {
                    self.escrow.lend(
                        policy.id,
                        &policy.name,
                        &request.key,
                        rate,
                        LoanAsk {
                            wanted: request.wanted,
                            partial: request.partial,
                            room: request.room.clamp(0, whole),
                            kept: request.kept.clamp(0, whole),
                        },
                    )
                } else {
                    (0, 0)
                }
            }
            _ => (0, 0),
        };
        let result = if request.give > 0 {
            "given"
        } else if lent > 0 {
            "lent"
        } else {
            "declined"
        };
        self.limiter.metrics().count_loan("lender", result);
        let in_transit = if request.give == 0 && request.wanted == 0 && lent > 0 {
            self.note_lent_to_even_out(&request.policy, &request.key, lent)
        } else {
            self.in_transit(&request.policy, &request.key)
        };
        LendAnswer {
            replica: me,
            nonce: request.nonce,
            lent,
            level,
            in_transit,
        }
    }

    /// How long the units a lender lends to even out can be in nobody's sub-bucket: the
    /// borrower waits up to a loan timeout for the answer, then gives each member of its group
    /// its part, one at a time, each waited for up to a loan timeout, and keeps the rest. A
    /// group has fewer members than the allocation, so a loan timeout per member bounds it.
    fn transit_horizon(&self, policy: &str) -> Duration {
        let members = u32::try_from(self.escrow.lenders(policy).len()).unwrap_or(u32::MAX);
        self.options
            .loan_timeout
            .saturating_mul(members.saturating_add(1))
    }

    /// Count `units` lent to even out `key`; returns what is in transit now
    /// ([`Replicator::in_transit`]).
    fn note_lent_to_even_out(&self, policy: &str, key: &str, units: i128) -> i128 {
        /// Entries kept before the ones older than a horizon are dropped.
        const PRUNE_AT: usize = 4096;
        let now = tokio::time::Instant::now();
        let horizon = self.transit_horizon(policy);
        let mut lent = self
            .lent_to_even_out
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if lent.len() >= PRUNE_AT {
            lent.retain(|_, (at, _)| now.duration_since(*at) <= horizon);
        }
        let entry = lent
            .entry((policy.to_owned(), key.to_owned()))
            .or_insert((now, 0));
        let earlier = if now.duration_since(entry.0) <= horizon {
            entry.1
        } else {
            0
        };
        *entry = (now, earlier.saturating_add(units));
        entry.1
    }

    /// Units of `key` this replica lent to peers' evenings out that may not have reached a
    /// sub-bucket yet: whatever it lent within a [`Replicator::transit_horizon`] of its last
    /// such loan. No member's level includes them, so a borrower that adds up levels to see
    /// whether the cluster is dry (and then refuses without asking until refill could make up
    /// the difference) counts these too; it may count some twice once they land, which only
    /// makes it ask again sooner.
    fn in_transit(&self, policy: &str, key: &str) -> i128 {
        let horizon = self.transit_horizon(policy);
        let lent = self
            .lent_to_even_out
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        lent.get(&(policy.to_owned(), key.to_owned()))
            .filter(|(at, _)| at.elapsed() <= horizon)
            .map_or(0, |&(_, units)| units)
    }

    /// Ask one peer for a loan. `None` when it did not answer well (unreachable, slow, or an
    /// answer that is not signed, not for this request or not from the replica expected).
    async fn ask_loan(
        &self,
        address: &str,
        lender: u64,
        request: &LendRequest,
    ) -> Option<LendAnswer> {
        let body = serde_json::to_vec(request).expect("serializing plain data cannot fail");
        // Waiting for a turn counts against the loan's time.
        let deadline = tokio::time::Instant::now() + self.options.loan_timeout;
        let _turn = tokio::time::timeout_at(deadline, self.turn(address))
            .await
            .ok()?;
        let (headers, _) = self.auth_headers("/v1/lend", &body, body.len(), Some(lender));
        let mut post = self
            .client
            .post(format!("{}://{address}/v1/lend", self.scheme))
            .timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        for (name, value) in headers {
            post = post.header(name, value);
        }
        let response = post
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let certificate = server_certificate(&response);
        let body = self
            .read_signed_answer(response, MAX_LEND_ANSWER_BYTES)
            .await
            .ok()?;
        let answer: LendAnswer = serde_json::from_slice(&body).ok()?;
        // With nodes bound: from the node this address answered hello as.
        let from_its_node = || {
            let node = self.with_peer(address, |peer| peer.node.clone());
            node.is_some_and(|node| self.answered_by(certificate.as_ref(), &node, Some(lender)))
        };
        (answer.nonce == request.nonce
            && answer.replica == lender
            && (0..=answer.level.max(0)).contains(&answer.lent)
            && (!self.binds_nodes() || from_its_node()))
        .then_some(answer)
    }

    /// Borrow `shortfall.units` of `key` for one `strict` request from the other members of
    /// the allocation, largest share first: first from one peer that holds it all, else (when
    /// together they hold enough) a part from each. Peers are asked one at a time, each for at
    /// most the loan timeout.
    pub async fn borrow(&self, policy: &str, key: &str, rate: Rate, shortfall: Shortfall) -> Loan {
        let members = self.escrow.lenders(policy);
        let addresses: BTreeMap<u64, String> = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p.up && !p.address.starts_with("node:"))
            .filter_map(|p| Some((p.replica?, p.address.clone())))
            .collect();
        let lenders: Vec<(u64, &String)> = members
            .iter()
            .filter_map(|(m, _)| Some((*m, addresses.get(m)?)))
            .collect();
        let me = self.limiter.store().replica().0;
        let nonce = loan_nonce();
        let request = LendRequest {
            v: LEND_VERSION,
            replica: me,
            nonce,
            policy: policy.to_owned(),
            key: key.to_owned(),
            capacity: rate.capacity(),
            interval_ms: rate.interval_ms(),
            wanted: shortfall.units,
            partial: false,
            room: shortfall.room,
            kept: 0,
            give: 0,
        };
        let metrics = self.limiter.metrics();
        let mut held: BTreeMap<u64, i128> = BTreeMap::new();
        // Lent to even out and perhaps in nobody's sub-bucket yet, by this replica or a peer.
        let whole = cost_units(rate, rate.capacity());
        let mut in_transit = self.in_transit(policy, key);
        // One peer that holds it all: the usual case, one round trip.
        for (n, &(lender, address)) in lenders.iter().enumerate() {
            let Some(answer) = self.ask_loan(address, lender, &request).await else {
                continue;
            };
            held.insert(lender, answer.level);
            in_transit = in_transit.saturating_add(answer.in_transit.clamp(0, whole));
            if answer.lent > 0 {
                metrics.count_loan("borrower", "granted");
                let capacity_of = |m: u64| {
                    capacity(
                        rate,
                        members
                            .iter()
                            .find(|(id, _)| *id == m)
                            .map_or(0, |&(_, u)| u),
                    )
                };
                return Loan {
                    lent: answer.lent,
                    peers_held: None,
                    even_out: Some(EvenOut {
                        lender: (
                            (lender, address.clone()),
                            capacity_of(lender),
                            answer.level - answer.lent,
                        ),
                        rest: lenders[n + 1..]
                            .iter()
                            .map(|&(m, a)| ((m, a.clone()), capacity_of(m)))
                            .collect(),
                    }),
                };
            }
        }
        let everyone = members.iter().all(|(m, _)| held.contains_key(m));
        let total: i128 = held.values().sum();
        // What the cluster holds at most: tokens in transit are in no level (the test
        // `tokens_in_transit_in_an_evening_out_do_not_make_the_cluster_look_empty`).
        let held_at_most = total.saturating_add(in_transit);
        // Together they may: a part from each (asked at once), planned so that every
        // sub-bucket is left equally full, from what each said it held.
        let quoted: Vec<(u64, &String, i128, i128)> = lenders
            .iter()
            .filter_map(|&(m, address)| {
                let share = members
                    .iter()
                    .find(|(id, _)| *id == m)
                    .map_or(0, |&(_, u)| u);
                Some((m, address, *held.get(&m)?, capacity(rate, share)))
            })
            .collect();
        let plan = plan_pool(
            (shortfall.needed - shortfall.units, shortfall.room),
            &quoted
                .iter()
                .map(|&(_, _, level, cap)| (level, cap))
                .collect::<Vec<_>>(),
            shortfall.needed,
        );
        let mut lent = 0;
        if let Some(plan) = plan {
            let asks = quoted
                .iter()
                .zip(plan)
                .filter(|(_, wanted)| *wanted > 0)
                .map(|(&(lender, address, _, _), wanted)| {
                    let request = LendRequest {
                        nonce: loan_nonce(),
                        wanted,
                        partial: true,
                        room: 0,
                        ..request.clone()
                    };
                    async move { self.ask_loan(address, lender, &request).await }
                });
            lent = futures_util::future::join_all(asks)
                .await
                .into_iter()
                .flatten()
                .map(|answer| answer.lent)
                .sum();
        }
        metrics.count_loan(
            "borrower",
            if lent >= shortfall.units {
                "pooled"
            } else if held_at_most < shortfall.units && everyone {
                "dry"
            } else {
                "failed"
            },
        );
        Loan {
            lent,
            peers_held: everyone.then_some(held_at_most),
            even_out: None,
        }
    }

    /// Evenings out still running: tokens they move are in transit (neither side can spend
    /// them) until they finish.
    pub fn evening_out(&self) -> usize {
        self.evening_out.load(std::sync::atomic::Ordering::Acquire)
    }

    /// After a loan: even out `key`'s sub-buckets with the peers that were not asked, off the
    /// request's path (in the background, one peer at a time). Each evens out with the group
    /// of this replica and the peers already evened out with (as if they were one sub-bucket:
    /// `SubBucket::lend`); this replica keeps its part of what it lends and gives each group
    /// member its own. A sub-bucket left full while others are not loses its refill, which
    /// pairwise evening out left a few percent of the time (escrow/tests.rs).
    pub fn even_out(
        self: &Arc<Self>,
        policy: &Policy,
        key: &str,
        rate: Rate,
        room: i128,
        even: Option<EvenOut>,
    ) {
        let Some(even) = even.filter(|e| !e.rest.is_empty() && room > 0) else {
            return;
        };
        let (replicator, policy_id, policy, key) =
            (self.clone(), policy.id, policy.name.clone(), key.to_owned());
        let running = InFlight::start(&self.evening_out);
        self.spawn_at_home(async move {
            let _running = running;
            let escrow = &replicator.escrow;
            let ask = |nonce| LendRequest {
                v: LEND_VERSION,
                replica: replicator.limiter.store().replica().0,
                nonce,
                policy: policy.clone(),
                key: key.clone(),
                capacity: rate.capacity(),
                interval_ms: rate.interval_ms(),
                wanted: 0,
                partial: false,
                room: 0,
                kept: 0,
                give: 0,
            };
            // The others in the group: (peer, capacity, level as last heard).
            let mut group = vec![even.lender];
            for (peer, capacity) in even.rest {
                let own = escrow.level(policy_id, &policy, &key, rate);
                let group_room = room + group.iter().map(|g| g.1).sum::<i128>();
                let group_kept = own + group.iter().map(|g| g.2).sum::<i128>();
                let request = LendRequest {
                    room: group_room,
                    kept: group_kept,
                    ..ask(loan_nonce())
                };
                let Some(answer) = replicator.ask_loan(&peer.1, peer.0, &request).await else {
                    continue;
                };
                let ratio = (group_kept + answer.lent) as f64 / group_room as f64;
                let mut left = answer.lent;
                for member in &mut group {
                    let part = ((ratio * member.1 as f64) as i128 - member.2).clamp(0, left);
                    if part > 0 {
                        let gift = LendRequest {
                            give: part,
                            ..ask(loan_nonce())
                        };
                        // Lost on the way, it is lost for good: that only refuses.
                        replicator.ask_loan(&member.0.1, member.0.0, &gift).await;
                        member.2 += part;
                        left -= part;
                    }
                }
                escrow.take_balance(policy_id, &policy, &key, rate, left);
                if answer.lent > 0 {
                    replicator
                        .limiter
                        .metrics()
                        .count_loan("borrower", "evened_out");
                }
                group.push((peer, capacity, answer.level - answer.lent));
            }
        });
    }

    /// Publish `openclaw_peers` and per-peer lag (called at scrape time).
    pub fn publish_gauges(&self) {
        let now = self.limiter.now();
        let metrics = self.limiter.metrics();
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let outbound = peers.values().filter(|p| !p.address.starts_with("node:"));
        let (up, down) = outbound.fold(
            (0, 0),
            |(u, d), p| if p.up { (u + 1, d) } else { (u, d + 1) },
        );
        metrics
            .peers
            .get_or_create(&StateLabels { state: "up" })
            .set(up);
        metrics
            .peers
            .get_or_create(&StateLabels { state: "down" })
            .set(down);
        metrics.replication_lag.clear();
        metrics.peer_clock_offset.clear();
        let clock = self.limiter.clock();
        metrics
            .clock_lead
            .set((clock.lead_us() as f64 - clock.lag_us() as f64) / 1e6);
        // A peer discovery lists always counts (silent, it must show a growing lag and alert).
        // A node only heard from counts while it keeps talking: a replica that left (a
        // scale-down) is no longer discovered, and its lag must not grow for ever and alert.
        let horizon =
            u64::try_from((HEARD_ONLY_ROUNDS * self.options.anti_entropy_interval).as_micros())
                .unwrap_or(u64::MAX);
        let discovered: BTreeSet<&str> = peers
            .values()
            .filter(|p| !p.address.starts_with("node:"))
            .filter_map(|p| p.node.as_deref())
            .collect();
        let current = |p: &PeerStatus| {
            !p.address.starts_with("node:")
                || p.node.as_deref().is_some_and(|n| discovered.contains(n))
                || p.last_contact_us
                    .is_some_and(|t| now.saturating_sub(t) <= horizon)
        };
        // Per node, the freshest merge, and the offset of the latest contact, among its
        // entries (outbound and heard).
        type Latest = (Option<Micros>, Option<(Micros, i64)>);
        let mut nodes: BTreeMap<&str, Latest> = BTreeMap::new();
        for peer in peers.values().filter(|p| current(p)) {
            let Some(node) = peer.node.as_deref() else {
                continue;
            };
            let entry = nodes.entry(node).or_default();
            entry.0 = entry.0.max(peer.last_merge_us);
            if let Some(offset) = peer.clock_offset_us {
                let at = peer.last_contact_us.unwrap_or(0);
                if entry.1.is_none_or(|(seen, _)| at >= seen) {
                    entry.1 = Some((at, offset));
                }
            }
        }
        for (node, (merged, offset)) in nodes {
            let labels = PeerLabels {
                peer: node.to_owned(),
            };
            if let Some((_, offset)) = offset {
                metrics
                    .peer_clock_offset
                    .get_or_create(&labels)
                    .set(offset as f64 / 1e6);
            }
            if let Some(merged) = merged {
                let lag = now.saturating_sub(merged) as f64 / 1e6;
                metrics.replication_lag.get_or_create(&labels).set(lag);
            }
        }
    }

    fn sign(&self, timestamp: Micros, body: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(timestamp.to_string().as_bytes());
        context.update(b"\n");
        context.update(body);
        hex(context.sign().as_ref())
    }

    /// The head signature of a request to `path` whose body of `length` bytes is signed with
    /// `body_signature` (hex, as sent).
    fn sign_head(
        &self,
        timestamp: Micros,
        path: &str,
        length: usize,
        body_signature: &str,
    ) -> String {
        hex(hmac::sign(
            &self.key,
            format!("head\n{timestamp}\n{path}\n{length}\n{body_signature}").as_bytes(),
        )
        .as_ref())
    }

    /// The recipient-bound head signature ([`BOUND_SIGNATURE_HEADER`]).
    fn sign_bound(
        &self,
        timestamp: Micros,
        path: &str,
        length: usize,
        body_signature: &str,
        recipient: u64,
    ) -> String {
        hex(hmac::sign(
            &self.key,
            format!("bound\n{timestamp}\n{path}\n{length}\n{body_signature}\n{recipient}")
                .as_bytes(),
        )
        .as_ref())
    }

    /// The authentication headers of a request to `path` for the replica `recipient` (`None`
    /// only for `GET /v1/hello` and, in legacy mode, for a peer of an earlier version): its
    /// timestamp, its body's signature (a GET signs its path), and the head signature bound to
    /// the recipient. In legacy mode a request with a body also carries the head signature
    /// earlier versions check.
    fn auth_headers(
        &self,
        path: &str,
        signed: &[u8],
        length: usize,
        recipient: Option<u64>,
    ) -> (Vec<(&'static str, String)>, String) {
        let timestamp = self.limiter.now();
        let signature = self.sign(timestamp, signed);
        let headers = self.signed_headers(path, timestamp, &signature, length, recipient);
        (headers, signature)
    }

    /// The body of a peer's answer, read up to `limit` bytes, once its signature checks out.
    async fn read_signed_answer(
        &self,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, String> {
        let headers = response.headers().clone();
        let body = read_limited(response, limit).await?;
        self.verify(&headers, &body).map_err(|e| e.to_string())?;
        Ok(body)
    }

    /// A signed `GET {url_path}` to the peer at `address`, bound to `recipient`: the signature
    /// covers `GET {url_path}` in place of a body (as [`HELLO_PATH`] and [`state_path`] say on
    /// the listener's side). Returns the request and its signature, which the answer names.
    fn signed_get(
        &self,
        address: SocketAddr,
        url_path: &str,
        recipient: Option<u64>,
    ) -> (reqwest::RequestBuilder, String) {
        let path = format!("GET {url_path}");
        let (headers, signature) = self.auth_headers(&path, path.as_bytes(), 0, recipient);
        let request = headers.into_iter().fold(
            self.client
                .get(format!("{}://{address}{url_path}", self.scheme)),
            |request, (name, value)| request.header(name, value),
        );
        (request, signature)
    }

    /// [`Replicator::auth_headers`] of a body signed already (at `timestamp`, `signature`).
    fn signed_headers(
        &self,
        path: &str,
        timestamp: Micros,
        signature: &str,
        length: usize,
        recipient: Option<u64>,
    ) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (TIMESTAMP_HEADER, timestamp.to_string()),
            (SIGNATURE_HEADER, signature.to_owned()),
        ];
        if let Some(recipient) = recipient {
            headers.push((RECIPIENT_HEADER, recipient.to_string()));
            headers.push((
                BOUND_SIGNATURE_HEADER,
                self.sign_bound(timestamp, path, length, signature, recipient),
            ));
        }
        if self.options.legacy_signatures && length > 0 {
            headers.push((
                HEAD_SIGNATURE_HEADER,
                self.sign_head(timestamp, path, length, signature),
            ));
        }
        headers
    }

    /// `messages`, each signed once for every peer it goes to.
    fn outgoing(&self, messages: Vec<Vec<u8>>) -> Arc<Vec<Outgoing>> {
        let timestamp = self.limiter.now();
        Arc::new(
            messages
                .into_iter()
                .map(|body| Outgoing {
                    signature: self.sign(timestamp, &body),
                    timestamp,
                    body: Bytes::from(body),
                })
                .collect(),
        )
    }

    /// Check a request's recipient-bound signature, when it has one (`Ok(false)` when not):
    /// authenticated first, then refused as `misdirected` unless it is for this replica.
    fn check_bound(
        &self,
        headers: &HeaderMap,
        timestamp: Micros,
        path: &str,
        length: u64,
    ) -> Result<bool, Rejection> {
        let Some(bound) = headers.get(BOUND_SIGNATURE_HEADER) else {
            return Ok(false);
        };
        let bound = bound
            .to_str()
            .ok()
            .and_then(unhex)
            .ok_or(Rejection::Unauthenticated(
                "malformed recipient-bound signature",
            ))?;
        let recipient: u64 = header(headers, RECIPIENT_HEADER)
            .and_then(|v| v.parse().ok())
            .ok_or(Rejection::Unauthenticated("missing or malformed recipient"))?;
        let body_signature = header(headers, SIGNATURE_HEADER).unwrap_or_default();
        self.check_signature(
            format!("bound\n{timestamp}\n{path}\n{length}\n{body_signature}\n{recipient}")
                .as_bytes(),
            &bound,
        )?;
        if recipient != self.limiter.store().replica().0 {
            return Err(Rejection::Misdirected(recipient));
        }
        Ok(true)
    }

    /// Authenticate a GET to `path` (which it signs in place of a body), bound to this replica
    /// unless `bound` is false (`GET /v1/hello`) or legacy mode takes an unbound one, and take
    /// it once. Returns its signature (hex), which the answer names.
    fn verify_get(
        &self,
        headers: &HeaderMap,
        path: &str,
        bound: bool,
    ) -> Result<String, Rejection> {
        let (timestamp, signature) = self.signature_headers(headers)?;
        self.check_signature(format!("{timestamp}\n{path}").as_bytes(), &signature)?;
        if bound
            && !self.check_bound(headers, timestamp, path, 0)?
            && !self.options.legacy_signatures
        {
            return Err(Rejection::Unauthenticated(MISSING_BOUND));
        }
        self.first_sighting(timestamp, &signature)?;
        Ok(hex(&signature))
    }

    /// The replica id of the peer at `address`, which its requests are bound to: known from an
    /// earlier signed answer, else asked with `GET /v1/hello`. `None` only in legacy mode, from
    /// a peer of an earlier version (no such route).
    async fn recipient(&self, address: SocketAddr) -> Result<Option<u64>, String> {
        if let Some(replica) = self.with_peer(&address.to_string(), |peer| peer.replica) {
            return Ok(Some(replica));
        }
        let _turn = self.turn(&address.to_string()).await;
        let (request, signature) = self.signed_get(address, "/v1/hello", None);
        let response = request.send().await.map_err(|e| e.to_string())?;
        if response.status() == StatusCode::NOT_FOUND && self.options.legacy_signatures {
            return Ok(None);
        }
        if response.status() == StatusCode::NOT_FOUND {
            return Err(
                "peer has no GET /v1/hello: a replica of an earlier version? \
                        (OPENCLAW_PEER_LEGACY_SIGNATURES=true during a rolling upgrade)"
                    .into(),
            );
        }
        if !response.status().is_success() {
            return Err(format!("peer answered {} to hello", response.status()));
        }
        let certificate = server_certificate(&response);
        let body = self.read_signed_answer(response, MAX_HELLO_BYTES).await?;
        let hello: Hello = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        if hello.re != signature {
            return Err("hello answer not for this request".into());
        }
        if !self.answered_by(certificate.as_ref(), &hello.node, Some(hello.replica)) {
            return Err(format!(
                "the peer says it is node {:?} but its certificate does not name that node \
                 (OPENCLAW_PEER_TLS_BIND_NODE)",
                hello.node
            ));
        }
        self.with_peer(&address.to_string(), |peer| {
            peer.node = Some(hello.node);
            peer.replica = Some(hello.replica);
            peer.reads_version = hello.v;
        });
        Ok(Some(hello.replica))
    }

    /// A turn to send one request to the peer at `address`: at most
    /// [`ReplicationOptions::max_requests_per_peer`] are in flight to it at once, below its
    /// listener's per-source cap, which closes any connection beyond unread (a burst of
    /// `strict` loans was refused that way while the peer held the tokens). Held until the
    /// answer is read.
    async fn turn(&self, address: &str) -> tokio::sync::OwnedSemaphorePermit {
        let semaphore = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(address.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    self.options.max_requests_per_peer.max(1),
                ))
            })
            .clone();
        semaphore
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// The peer at `address` refused a request as not for it (`421`): another process answers
    /// there now; its replica id is asked again before the next request.
    fn forget_recipient(&self, address: &str) {
        self.with_peer(address, |peer| {
            peer.replica = None;
            peer.in_sync = false;
            peer.reads_version = 0;
        });
    }

    /// The signature headers of a peer message: its timestamp (checked fresh) and signature.
    /// Checked before a byte of a request's body is read.
    fn signature_headers(&self, headers: &HeaderMap) -> Result<(Micros, Vec<u8>), Rejection> {
        let timestamp: Micros = header(headers, TIMESTAMP_HEADER)
            .and_then(|v| v.parse().ok())
            .ok_or(Rejection::Unauthenticated("missing or malformed timestamp"))?;
        let signature = header(headers, SIGNATURE_HEADER)
            .and_then(unhex)
            .ok_or(Rejection::Unauthenticated("missing or malformed signature"))?;
        if self.limiter.now().abs_diff(timestamp) > MAX_CLOCK_SKEW_US {
            return Err(Rejection::Unauthenticated(
                "timestamp too far from this replica's clock",
            ));
        }
        Ok((timestamp, signature))
    }

    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Rejection> {
        let (timestamp, signature) = self.signature_headers(headers)?;
        let mut signed = Vec::with_capacity(body.len() + 24);
        signed.extend_from_slice(timestamp.to_string().as_bytes());
        signed.push(b'\n');
        signed.extend_from_slice(body);
        self.check_signature(&signed, &signature)
    }

    fn check_signature(&self, signed: &[u8], signature: &[u8]) -> Result<(), Rejection> {
        hmac::verify(&self.key, signed, signature).map_err(|_| {
            Rejection::Unauthenticated(
                "bad signature (is OPENCLAW_PEER_SECRET the same on every replica?)",
            )
        })
    }

    /// A peer request's body to `path`, authenticated. Its head is authenticated first (the
    /// timestamp, fresh, and the head signature over it, the path, the length and the body's
    /// signature) and a replay refused, so that nothing without the secret gets a byte of its
    /// body read; the body is then read within `limit` and [`BODY_DEADLINE`], holding a permit
    /// of the replica-wide budget per byte (a request that would exceed it is refused at once:
    /// `busy`), and its signature checked over the bytes as they come.
    async fn read_signed(
        &self,
        headers: &HeaderMap,
        body: Body,
        limit: usize,
        path: &str,
    ) -> Result<SignedBody, Rejection> {
        use futures_util::StreamExt;
        let (timestamp, signature) = self.signature_headers(headers)?;
        let announced =
            header(headers, axum::http::header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|length| length > limit as u64) {
            return Err(Rejection::TooLarge);
        }
        if headers.contains_key(BOUND_SIGNATURE_HEADER) {
            let length = announced.ok_or(Rejection::Unauthenticated(
                "a signed head needs a content-length",
            ))?;
            self.check_bound(headers, timestamp, path, length)?;
            if self.seen_already(timestamp, &signature) {
                return Err(Rejection::Replayed);
            }
        } else if !self.options.legacy_signatures {
            return Err(Rejection::Unauthenticated(MISSING_BOUND));
        } else if let Some(head) = headers.get(HEAD_SIGNATURE_HEADER) {
            // Legacy mode: the head signature of earlier versions, bound to no recipient.
            let head = head
                .to_str()
                .ok()
                .and_then(unhex)
                .ok_or(Rejection::Unauthenticated("malformed head signature"))?;
            let length = announced.ok_or(Rejection::Unauthenticated(
                "a signed head needs a content-length",
            ))?;
            let body_signature = header(headers, SIGNATURE_HEADER).unwrap_or_default();
            self.check_signature(
                format!("head\n{timestamp}\n{path}\n{length}\n{body_signature}").as_bytes(),
                &head,
            )?;
            if self.seen_already(timestamp, &signature) {
                return Err(Rejection::Replayed);
            }
        }
        // The signed bytes are `timestamp \n body`. The body is kept as the chunks that came
        // (no buffer grown by doubling: what is held is what was sent) and signed as it comes.
        let mut context = hmac::Context::with_key(&self.key);
        context.update(format!("{timestamp}\n").as_bytes());
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut length = 0;
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut stream = body.into_data_stream();
        let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
        while let Some(chunk) = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| Rejection::TooSlow)?
        {
            let chunk = chunk.map_err(|e| Rejection::Malformed(format!("body: {e}")))?;
            if length + chunk.len() > limit {
                return Err(Rejection::TooLarge);
            }
            let permit = u32::try_from(chunk.len())
                .ok()
                .and_then(|n| self.unverified.clone().try_acquire_many_owned(n).ok())
                .ok_or(Rejection::Busy)?;
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            context.update(&chunk);
            length += chunk.len();
            chunks.push(chunk);
        }
        // Compared in constant time: HMACs of both under a key of this process's own.
        let tag = context.sign();
        let expected = hmac::sign(&self.compare_key, tag.as_ref());
        hmac::verify(&self.compare_key, &signature, expected.as_ref()).map_err(|_| {
            Rejection::Unauthenticated(
                "bad signature (is OPENCLAW_PEER_SECRET the same on every replica?)",
            )
        })?;
        self.first_sighting(timestamp, &signature)?;
        let body = match chunks.len() {
            1 => chunks.pop().expect("one chunk"),
            _ => {
                let mut body = Vec::with_capacity(length);
                for chunk in chunks {
                    body.extend_from_slice(&chunk);
                }
                Bytes::from(body)
            }
        };
        Ok(SignedBody { body, _held: held })
    }

    /// Whether an authenticated request with this timestamp and signature was taken already.
    fn seen_already(&self, timestamp: Micros, signature: &[u8]) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.contains(&(timestamp, signature.to_vec()))
    }

    /// Take an authenticated request once: a second one with the same timestamp and signature
    /// is a replay. Entries are kept while their timestamp is fresh (after that, freshness
    /// refuses the replay), so only authenticated requests take room, for 5 minutes each.
    fn first_sighting(&self, timestamp: Micros, signature: &[u8]) -> Result<(), Rejection> {
        let now = self.limiter.now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = now.saturating_sub(MAX_CLOCK_SKEW_US);
        if seen.first().is_some_and(|(t, _)| *t < horizon) {
            *seen = seen.split_off(&(horizon, Vec::new()));
        }
        if seen.insert((timestamp, signature.to_vec())) {
            Ok(())
        } else {
            Err(Rejection::Replayed)
        }
    }

    /// Bytes of request bodies held now before authentication.
    pub fn unverified_bytes(&self) -> usize {
        self.options.unverified_budget - self.unverified.available_permits()
    }

    /// Encode buckets as one or more messages, each under the size bound, in version 2.
    fn encode(&self, full: bool, buckets: &[HeldBucket]) -> Vec<Vec<u8>> {
        let chunk = if full { FULL_SYNC_CHUNK } else { usize::MAX };
        self.encode_chunked(full, buckets, chunk, PROTOCOL_VERSION)
    }

    /// One page of the whole state (`GET /v1/state?from=`, anti-entropy): the buckets of the
    /// shards from `from` on, at least `FULL_SYNC_CHUNK` of them unless the state ends first, as
    /// one message; the shard the next page starts at; and how many buckets it holds.
    fn state_page(&self, from: usize) -> (Vec<u8>, Option<usize>, usize) {
        let mut buckets = Vec::new();
        let next =
            self.limiter
                .store()
                .for_each_page(from, FULL_SYNC_CHUNK, |policy, key, state| {
                    buckets.push((policy, CompactString::from(key), state.clone()));
                });
        let entries = buckets.len();
        let mut messages = self.encode_chunked(true, &buckets, usize::MAX, PROTOCOL_VERSION);
        (messages.pop().expect("one message per page"), next, entries)
    }

    /// Messages of at most `chunk` buckets each, in `version`: [`PROTOCOL_VERSION`],
    /// [`COMPACT_VERSION`] or [`BINARY_VERSION`]. Entries are written straight from the
    /// buckets: a round's entries as values of their own were two copies of a 700 KB vector
    /// per round, whose fresh pages showed in a replica's profile (page faults,
    /// `malloc_consolidate`).
    fn encode_chunked(
        &self,
        full: bool,
        buckets: &[HeldBucket],
        chunk: usize,
        version: u32,
    ) -> Vec<Vec<u8>> {
        let compact = version >= COMPACT_VERSION;
        let policies = self.limiter.policies();
        let sent_at = self.limiter.now();
        // The tables the entries refer to, and each bucket's policy index (`None` for a
        // policy removed since: not sent).
        let mut names: Vec<String> = Vec::new();
        let mut index_of: Vec<(PolicyId, Option<u32>)> = Vec::new();
        let mut replicas: Vec<u64> = Vec::new();
        let mut replica_index: BTreeMap<u64, u64> = BTreeMap::new();
        let mut policy_index: Vec<Option<u32>> = Vec::with_capacity(buckets.len());
        for (policy, _, state) in buckets {
            let index = match index_of.iter().find(|(id, _)| id == policy) {
                Some(&(_, index)) => index,
                None => {
                    let index = policies.by_id(*policy).map(|policy| {
                        names.push(policy.name.clone());
                        names.len() as u32 - 1
                    });
                    index_of.push((*policy, index));
                    index
                }
            };
            policy_index.push(index);
            if compact && index.is_some() {
                let ids = std::iter::once(state.rebaser().0)
                    .chain(state.components().iter().map(|c| c.replica.0));
                for id in ids {
                    replica_index.entry(id).or_insert_with(|| {
                        replicas.push(id);
                        replicas.len() as u64 - 1
                    });
                }
            }
        }
        let form = WireForm {
            compact,
            sent_at,
            replica_index: &replica_index,
        };
        let escrow = self.escrow_control();
        let escrow_text = escrow
            .as_ref()
            .filter(|_| version == BINARY_VERSION)
            .map(escrow_json);
        let node = self.limiter.node_id();
        let replica = self.limiter.store().replica().0;
        let chunk = chunk.max(1);
        let mut messages = Vec::new();
        let mut from: usize = 0;
        // A full sync of an empty store still sends one (empty) message: it is the heartbeat
        // that tells peers we are alive and what our node id is.
        loop {
            let to = buckets.len().min(from.saturating_add(chunk));
            let entries = EntriesOut {
                buckets: &buckets[from..to],
                policy_index: &policy_index[from..to],
                form: &form,
            };
            // About 35 bytes an entry in version 4, 50 in version 3, 100 in version 2: room for
            // most rounds without growing the buffer.
            let mut body = Vec::with_capacity(256 + (to - from) * if compact { 64 } else { 128 });
            if version == BINARY_VERSION {
                let message = BinaryMessageOut {
                    v: version,
                    node,
                    replica,
                    sent_at,
                    full,
                    policies: &names,
                    entries,
                    escrow: escrow_text.as_deref(),
                    replicas: &replicas,
                };
                body = postcard::to_extend(&message, body)
                    .expect("serializing plain data cannot fail");
            } else {
                let message = SyncMessageOut {
                    v: version,
                    node,
                    replica,
                    sent_at,
                    full,
                    policies: &names,
                    entries,
                    escrow: escrow.as_ref(),
                    // The whole table in every chunk: chunks are read on their own.
                    replicas: if compact { &replicas } else { &[] },
                };
                serde_json::to_writer(&mut body, &message)
                    .expect("serializing plain data cannot fail");
            }
            messages.push(body);
            if to == buckets.len() {
                return messages;
            }
            from = to;
        }
    }

    /// Merge a verified message; returns how many buckets changed.
    /// What the peer listener does with a `POST /v1/sync` body once it is authenticated:
    /// decode, validate, merge; returns the buckets changed. Public for the hostile-peer tests
    /// (`tests/hostile_peer.rs`) and the fuzz target (`limiter/fuzz`), which feed it what an
    /// attacker holding the secret could send; peers go through [`peer_router`].
    #[doc(hidden)]
    pub fn merge_authenticated(&self, body: &[u8]) -> Result<usize, String> {
        self.decode_and_apply(body, None)
            .map(|applied| applied.changed)
            .map_err(|e| e.to_string())
    }

    /// Whether every bucket this replica holds is one an honest cluster could have sent it:
    /// within [`MAX_COMPONENTS_PER_BUCKET`], and no component beyond what its owner can have
    /// admitted by this replica's clock and the guard. For the hostile-peer tests and the fuzz
    /// target; `Err` names the first bucket that is not.
    #[doc(hidden)]
    pub fn check_held_state(&self) -> Result<(), String> {
        let latest = self
            .limiter
            .now()
            .saturating_add(self.options.clock_guard.as_micros() as Micros);
        let policies = self.limiter.policies();
        let mut problem = None;
        self.limiter.store().for_each(|policy, key, state| {
            if problem.is_some() {
                return;
            }
            let Some(policy) = policies.by_id(policy) else {
                return;
            };
            if state.components().len() > MAX_COMPONENTS_PER_BUCKET {
                problem = Some(format!("{key}: {} components", state.components().len()));
            } else if let Some(c) = state.implausible_component(policy.rate_for(key), latest) {
                problem = Some(format!("{key}: implausible component {c:?}"));
            }
        });
        problem.map_or(Ok(()), Err)
    }

    /// Decode a `POST /v1/sync` body, check its sender against the certificate it came over
    /// (`certificate`, with nodes bound), and merge it.
    fn decode_and_apply(
        &self,
        body: &[u8],
        certificate: Option<&ClientCertificate>,
    ) -> Result<Applied, Rejection> {
        let message: SyncMessage = if is_binary(body) {
            decode_binary(body)?
        } else {
            let message: SyncMessage =
                serde_json::from_slice(body).map_err(|e| Rejection::Malformed(e.to_string()))?;
            // Version 4 is binary only: as JSON it is no version this replica reads.
            if message.v == BINARY_VERSION {
                return Err(Rejection::Incompatible(message.v));
            }
            message
        };
        self.check_sender(certificate, &message.node, message.replica)?;
        self.apply(message)
    }

    /// With nodes bound (`OPENCLAW_PEER_TLS_BIND_NODE`), a message is taken only from the node
    /// its client certificate names, and under a replica id that node owns
    /// ([`NodeBindings`]). Without, anything authenticated passes.
    fn check_sender(
        &self,
        certificate: Option<&ClientCertificate>,
        node: &str,
        replica: u64,
    ) -> Result<(), Rejection> {
        self.certified(
            certificate.and_then(ClientCertificate::get),
            node,
            Some(replica),
        )
        .map_err(Rejection::NotCertified)
    }

    /// With nodes bound: whether `certificate` (a peer's, client or server) names `node`, and
    /// `replica`, the id it speaks as, is that node's ([`NodeBindings`]: the first certified
    /// node heard with an id owns it). This replica's own id is never bound to another node
    /// (a message under it is refused as this replica's own when merged). Without, `Ok`.
    fn certified(
        &self,
        certificate: Option<&CertificateDer<'static>>,
        node: &str,
        replica: Option<u64>,
    ) -> Result<(), String> {
        let Some(tls) = self.options.tls.as_ref().filter(|tls| tls.binds_nodes()) else {
            return Ok(());
        };
        let Some(certificate) = certificate else {
            return Err("no certificate on the connection".into());
        };
        if !tls.names_node(certificate, node) {
            return Err(format!(
                "it says it is node {node:?}; its certificate does not name it"
            ));
        }
        match replica {
            Some(replica) if replica != self.limiter.store().replica().0 => self
                .bindings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .bind(replica, node),
            _ => Ok(()),
        }
    }

    /// With nodes bound, a loan is lent only to the replica id of the node the request's
    /// certificate names (heard from already: loans follow an allocation, which takes
    /// messages).
    fn check_borrower(
        &self,
        certificate: Option<&ClientCertificate>,
        replica: u64,
    ) -> Result<(), Rejection> {
        if !self.binds_nodes() {
            return Ok(());
        }
        let node = self
            .bindings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .node_of(replica)
            .map(str::to_owned)
            .ok_or_else(|| {
                Rejection::NotCertified(format!(
                    "replica {replica} has not been heard from as any node"
                ))
            })?;
        self.check_sender(certificate, &node, replica)
    }

    /// Whether messages and answers are taken only from the node their certificate names
    /// (`OPENCLAW_PEER_TLS_BIND_NODE`).
    fn binds_nodes(&self) -> bool {
        self.options
            .tls
            .as_ref()
            .is_some_and(|tls| tls.binds_nodes())
    }

    /// With nodes bound, whether `certificate`, the server certificate an answer came over,
    /// names `node` (the answer, or a hello, says it is from `node`), and `replica`, the id it
    /// answers as, is that node's ([`Replicator::certified`]). Without, always.
    fn answered_by(
        &self,
        certificate: Option<&CertificateDer<'static>>,
        node: &str,
        replica: Option<u64>,
    ) -> bool {
        self.certified(certificate, node, replica).is_ok()
    }

    /// Check a peer's send time against this replica's clock and follow it ([`follow_peer`]),
    /// unless this replica is the odd one out: when a strict majority of the cluster was last
    /// seen further from this replica's system clock than the guard
    /// ([`Replicator::majority_offsets_us`]), this replica's system clock is the wrong one (its
    /// NTP broken, its VM paused). Behind them, it catches up with them at once and follows
    /// them within the guard from there; ahead of them, it falls behind its system clock to
    /// their time, slowed down rather than stepped back ([`Clock::fall_behind`]). One peer, or
    /// a minority, still moves it no further than the guard, and a peer beyond the guard of
    /// its timeline is refused. Returns whether the peer was followed and its offset from this
    /// replica's system clock (before following it: it reads low by the network delay).
    fn follow_clock(&self, peer_time: Micros) -> (Result<(), ClockAhead>, OffsetUs) {
        let clock = self.limiter.clock();
        let offset = i64::try_from(i128::from(peer_time) - i128::from(clock.system_now()))
            .unwrap_or(if peer_time > 0 { i64::MAX } else { i64::MIN });
        let guard_us = self.options.clock_guard.as_micros() as Micros;
        let guard = i64::try_from(guard_us).unwrap_or(i64::MAX);
        let mut max_lead_us = guard_us;
        if let Some((ahead, behind)) = self.majority_offsets_us() {
            if ahead > guard {
                // Ahead of this replica's system clock by `ahead`: the lead that puts this
                // clock there, on top of any lag left to decay.
                let want = (ahead as Micros).saturating_add(clock.lag_us());
                let lead = clock.lead_us();
                if want > lead {
                    clock.catch_up(want - lead, want);
                    if lead <= guard_us {
                        tracing::warn!(
                            ahead_ms = ahead / 1000,
                            "a majority of the cluster runs further ahead of this replica's \
                             system clock than the clock guard: following it (check this \
                             host's time sync)"
                        );
                    }
                }
                max_lead_us = want.saturating_add(guard_us);
            } else if behind < -guard {
                let lag = behind.unsigned_abs();
                if clock.lag_us() <= guard_us && lag > clock.lag_us() {
                    tracing::warn!(
                        behind_ms = lag / 1000,
                        "a majority of the cluster runs further behind this replica's system \
                         clock than the clock guard: falling back to it (check this host's \
                         time sync)"
                    );
                }
                clock.fall_behind(lag);
            }
        }
        let followed = follow_peer(&*clock, peer_time, guard_us, max_lead_us).map(|_| ());
        (followed, offset)
    }

    /// Where a strict majority of the replicas runs against this replica's system clock: with
    /// `n` replicas (this one and the peers discovered, or every node heard from lately if
    /// there are more) and `k = ⌊n/2⌋ + 1`, the `k`-th largest and the `k`-th smallest of the
    /// peers' latest offsets. A replica cannot be in a majority away from itself, so `k` peers
    /// must be at least that far ahead (or behind). `None` with fewer than `k` offsets, and so
    /// always with fewer than three replicas: two cannot tell whose clock is wrong. Offsets
    /// older than a few anti-entropy rounds do not count.
    fn majority_offsets_us(&self) -> Option<(i64, i64)> {
        let horizon = HEARD_ONLY_ROUNDS * self.options.anti_entropy_interval;
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let discovered = peers.keys().filter(|a| !a.starts_with("node:")).count();
        // Per node, the offset seen last among its entries (outbound and heard).
        let mut latest: BTreeMap<&str, (std::time::Instant, i64)> = BTreeMap::new();
        for peer in peers.values() {
            let (Some(node), Some(offset), Some(seen)) = (
                peer.node.as_deref(),
                peer.clock_offset_us,
                peer.clock_offset_seen,
            ) else {
                continue;
            };
            if seen.elapsed() > horizon {
                continue;
            }
            let entry = latest.entry(node).or_insert((seen, offset));
            if seen >= entry.0 {
                *entry = (seen, offset);
            }
        }
        let replicas = discovered.max(latest.len()) + 1;
        let k = replicas / 2 + 1;
        let mut offsets: Vec<i64> = latest.values().map(|&(_, offset)| offset).collect();
        offsets.sort_unstable();
        let kth_smallest = *offsets.get(k - 1)?;
        let kth_largest = offsets[offsets.len() - k];
        Some((kth_largest, kth_smallest))
    }

    /// An answer's send time, when it is beyond the clock guard (an answer that does not say,
    /// from an earlier version, never is). Such an answer is not taken, as a message from there
    /// is not ([`Replicator::apply`]): a replica whose clock is beyond the guard must not count
    /// as heard from through its answers alone, or `strict` peers would keep its share in the
    /// allocation while it, refused everywhere, holds no lease to spend it (docs/crdt.md,
    /// "Clocks"). Counted as `openclaw_peer_clock_refused_total{reason="answer_ahead"}`.
    fn answer_clock_ahead(&self, answer: &SyncAnswer) -> Option<ClockAhead> {
        let ahead = self.follow_clock(answer.sent_at?).0.err()?;
        self.limiter
            .metrics()
            .peer_clock_refused
            .get_or_create(&ReasonLabels {
                reason: "answer_ahead",
            })
            .inc();
        Some(ahead)
    }

    /// Log that new buckets from `node` were refused for the store's size, at most once a
    /// minute (the counter counts every one).
    fn warn_store_full(&self, node: &str, entries: u64) {
        let now = std::time::Instant::now();
        let mut logged = self
            .store_full_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if logged.is_some_and(|at| now < at + Duration::from_secs(60)) {
            return;
        }
        *logged = Some(now);
        drop(logged);
        tracing::warn!(
            node,
            entries,
            max_buckets = self.options.max_buckets,
            "this replica holds OPENCLAW_MAX_BUCKETS buckets: new buckets from peers are refused \
             (counted as reason=\"store_full\"; logged at most once a minute)"
        );
    }

    fn apply(&self, message: SyncMessage<'_>) -> Result<Applied, Rejection> {
        if !matches!(
            message.v,
            PROTOCOL_VERSION_1 | PROTOCOL_VERSION | COMPACT_VERSION | BINARY_VERSION
        ) {
            return Err(Rejection::Incompatible(message.v));
        }
        if message.replica == self.limiter.store().replica().0 {
            return Err(Rejection::Malformed(
                "message from this replica itself".into(),
            ));
        }
        if message.node.is_empty()
            || message.node.len() > MAX_NODE_NAME_BYTES
            || message.node.chars().any(char::is_control)
        {
            return Err(Rejection::Malformed(format!(
                "node name must be 1 to {MAX_NODE_NAME_BYTES} bytes of printable text"
            )));
        }
        let metrics = self.limiter.metrics();
        let policies = self.limiter.policies();
        let upgrade = message.v == PROTOCOL_VERSION_1;
        // Validate everything before merging anything: a malformed message changes nothing.
        if let Some(control) = &message.escrow {
            control
                .validate()
                .map_err(|e| Rejection::Malformed(format!("escrow: {e}")))?;
        }
        let reader = EntryReader {
            compact: message.v >= COMPACT_VERSION,
            sent_at: message.sent_at,
            replicas: &message.replicas,
        };
        for entry in &message.entries {
            let WireEntry(policy_index, key, ..) = entry;
            if *policy_index as usize >= message.policies.len() {
                return Err(Rejection::Malformed(format!(
                    "policy index {policy_index} out of range"
                )));
            }
            if key.is_empty() || key.len() > crate::http::MAX_KEY_BYTES {
                return Err(Rejection::Malformed("key length out of range".into()));
            }
            if !reader.readable(entry) {
                return Err(Rejection::Malformed(
                    "an entry's replica index, stamp or absorbed value is out of range".into(),
                ));
            }
        }
        // The clock, once the message is known to be well formed: a peer ahead within the guard
        // pulls this replica's clock forward; one further ahead is refused whole. The offset
        // shown is against this replica's system clock (before the lead it took from faster
        // peers): followed or not, it says how far apart the clocks are.
        let guard_us = self.options.clock_guard.as_micros() as Micros;
        let peer_key = format!("node:{}", message.node);
        let (followed, clock_offset) = self.follow_clock(message.sent_at);
        match followed {
            Ok(()) => {}
            Err(ahead) => {
                metrics
                    .peer_clock_refused
                    .get_or_create(&ReasonLabels {
                        reason: "message_ahead",
                    })
                    .inc();
                self.with_peer(&peer_key, |peer| {
                    peer.node = Some(message.node.clone());
                    peer.clock_offset_us = Some(clock_offset);
                    peer.clock_offset_seen = Some(std::time::Instant::now());
                    if !peer.clock_refused {
                        peer.clock_refused = true;
                        tracing::warn!(node = %message.node, error = %ahead, "refusing a peer's messages: its clock is beyond the guard");
                    }
                });
                return Err(Rejection::ClockAhead(ahead));
            }
        }
        let now = self.limiter.now();
        let latest = now.saturating_add(guard_us);
        let mut changed = 0;
        let received = message.entries.len() as u64;
        let mut refused: [(&'static str, u64); 2] = [("epoch_ahead", 0), ("incarnation_ahead", 0)];
        let mut implausible: [(&'static str, u64); 2] =
            [("implausible_consumption", 0), ("too_many_components", 0)];
        let mut store_full = 0u64;
        // Entries of a policy this replica does not have (yet).
        let mut unknown_policy = 0u64;
        let bounds = MergeBounds {
            max_components: MAX_COMPONENTS_PER_BUCKET,
            max_buckets: self.options.max_buckets,
        };
        for entry in &message.entries {
            let WireEntry(policy_index, key, ..) = entry;
            let policy_index = *policy_index;
            let (epoch, rebaser, components) = reader.read(entry).expect("validated above");
            // A stamp beyond the guard would hold the bucket below its level (or win every
            // merge) for as long as it is ahead: refused, the rest of the message merged.
            if epoch > latest {
                refused[0].1 += 1;
                continue;
            }
            if components
                .iter()
                .any(|&(_, incarnation, _, _)| incarnation > latest)
            {
                refused[1].1 += 1;
                continue;
            }
            // A policy this replica does not have (a rollout of the policies file in progress):
            // nothing to merge into; the sender resends in its next anti-entropy round.
            let Some(policy) = policies.get(&message.policies[policy_index as usize]) else {
                unknown_policy += 1;
                continue;
            };
            // What an honest owner can have counted (docs/crdt.md, "What a peer may send"):
            // refused, never merged, the rest of the message merged.
            if components.len() > MAX_COMPONENTS_PER_BUCKET {
                implausible[1].1 += 1;
                continue;
            }
            let rate = policy.rate_for(key);
            let state = BucketState::from_parts(
                epoch,
                ReplicaId(rebaser),
                components
                    .into_iter()
                    .map(|(replica, incarnation, consumed, absorbed)| Component {
                        replica: ReplicaId(replica),
                        incarnation,
                        consumed,
                        absorbed: if upgrade && absorbed == 0 && incarnation < epoch {
                            UNLISTED
                        } else {
                            absorbed
                        },
                    }),
            );
            if state.implausible_component(rate, latest).is_some() {
                implausible[0].1 += 1;
                continue;
            }
            match self
                .limiter
                .store()
                .merge_bounded(policy.id, key, &state, rate, now, bounds)
            {
                Ok(true) => changed += 1,
                Ok(false) => {}
                // Within the bound on its own, beyond it with what this bucket holds already.
                Err(MergeRefused::TooManyComponents) => implausible[1].1 += 1,
                Err(MergeRefused::StoreFull) => store_full += 1,
            }
        }
        // Bucket state merges from a peer that refuses ours (counting what it spends is better
        // than not); its escrow state does not, or it would be heard from while it hears no
        // one: its share would stay in the allocation, unused (docs/crdt.md, "Clocks").
        if let Some(control) = &message.escrow
            && !self.refuses_our_clock(message.replica)
        {
            self.escrow.receive(message.replica, control);
        }
        for (reason, count) in refused {
            if count > 0 {
                metrics
                    .peer_clock_refused
                    .get_or_create(&ReasonLabels { reason })
                    .inc_by(count);
            }
        }
        for (reason, count) in implausible {
            if count > 0 {
                metrics
                    .peer_entries_refused
                    .get_or_create(&ReasonLabels { reason })
                    .inc_by(count);
                tracing::warn!(
                    node = %message.node,
                    reason,
                    entries = count,
                    "refused peer bucket entries no honest replica could have sent"
                );
            }
        }
        if store_full > 0 {
            metrics
                .peer_entries_refused
                .get_or_create(&ReasonLabels {
                    reason: "store_full",
                })
                .inc_by(store_full);
            self.warn_store_full(&message.node, store_full);
        }
        let any_refused = refused.iter().any(|&(_, count)| count > 0);
        metrics.merges.inc_by(changed as u64);
        metrics
            .replication_entries
            .get_or_create(&DirectionLabels {
                direction: "received",
            })
            .inc_by(received);
        self.with_peer(&format!("node:{}", message.node), |peer| {
            peer.node = Some(message.node.clone());
            peer.up = true;
            peer.last_contact_us = Some(now);
            peer.last_merge_us = Some(now);
            peer.clock_offset_us = Some(clock_offset);
            peer.clock_offset_seen = Some(std::time::Instant::now());
            peer.messages_received += 1;
            // Logged once per peer when refusals start and when they stop, not per message.
            if any_refused && !peer.clock_refused {
                tracing::warn!(node = %message.node, ?refused, "refusing bucket entries a peer stamped beyond the clock guard");
            } else if !any_refused && peer.clock_refused {
                tracing::info!(node = %message.node, "a peer's stamps are within the clock guard again");
            }
            peer.clock_refused = any_refused;
        });
        let not_merged = unknown_policy
            + store_full
            + refused
                .iter()
                .chain(&implausible)
                .map(|&(_, n)| n)
                .sum::<u64>();
        Ok(Applied {
            changed: changed as usize,
            complete: not_merged == 0,
        })
    }

    /// Send one signed message to a peer. Errors are recorded in the peer's status. Returns
    /// the answering replica's id when it took the message (`Ok(None)` from a peer that does
    /// not say), or why it did not.
    async fn send(
        &self,
        address: SocketAddr,
        message: &Outgoing,
    ) -> Result<Option<u64>, Undelivered> {
        let bytes = message.body.len() as u64;
        let signature = message.signature.as_str();
        let mut refuses_our_clock = false;
        let outcome = match self.post_sync(address, message).await {
            Ok(response) if response.status().is_success() => {
                // Delivered. What the answer says is trusted only when it is signed for this
                // request (and, with nodes bound, came over the certificate of the node it
                // names): its escrow state is merged and its replica counted toward the
                // lease. Anything else (an earlier version's unsigned answer, or something
                // answering for the peer's address) is a delivery and nothing more.
                let certificate = server_certificate(&response);
                let answer = self
                    .read_signed_answer(response, MAX_MESSAGE_BYTES)
                    .await
                    .ok()
                    .and_then(|body| serde_json::from_slice::<SyncAnswer>(&body).ok())
                    .filter(|answer| answer.re.as_deref() == Some(signature))
                    .filter(|answer| {
                        self.answered_by(certificate.as_ref(), &answer.node, answer.replica)
                    });
                let clock_ahead = answer.as_ref().and_then(|a| self.answer_clock_ahead(a));
                let answer = answer.filter(|_| clock_ahead.is_none());
                if let Some(SyncAnswer {
                    replica: Some(replica),
                    escrow: Some(control),
                    ..
                }) = &answer
                    && control.validate().is_ok()
                {
                    self.escrow.receive(*replica, control);
                }
                Ok((answer.map(|a| (a.node, a.replica, a.complete)), clock_ahead))
            }
            Ok(response) => {
                refuses_our_clock = response.status() == StatusCode::CONFLICT
                    && response
                        .headers()
                        .get(REFUSAL_HEADER)
                        .is_some_and(|reason| reason == CLOCK_AHEAD_REASON);
                Err((
                    format!("peer answered {}", response.status()),
                    Undelivered::Refused,
                ))
            }
            // Not reached, or another process answers there now (asked again already).
            Err(e) => Err((e, Undelivered::Unreachable)),
        };
        let now = self.limiter.now();
        let ok = outcome.is_ok();
        if ok {
            self.limiter
                .metrics()
                .replication_bytes
                .get_or_create(&DirectionLabels { direction: "sent" })
                .inc_by(bytes);
        }
        self.with_peer(&address.to_string(), |peer| {
            if refuses_our_clock && !peer.refuses_our_clock {
                tracing::warn!(peer = %address, "a peer refuses this replica's messages as stamped beyond its clock guard: not heard from in the escrow protocol until it takes them again");
            }
            // Unreachable says nothing about its clock: the mark stays until it answers.
            if refuses_our_clock || outcome.is_ok() {
                peer.refuses_our_clock = refuses_our_clock;
            }
            match &outcome {
                Err((e, _)) => {
                    if peer.up || peer.last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(peer = %address, error = %e, "replication to peer failed");
                    }
                    peer.last_error = Some(e.clone());
                }
                Ok((answer, clock_ahead)) => {
                    if !peer.up {
                        tracing::info!(peer = %address, "peer reachable");
                    }
                    // Logged when refusals start and when they stop, not per answer.
                    match (clock_ahead, peer.answer_clock_refused) {
                        (Some(ahead), false) => tracing::warn!(peer = %address, error = %ahead, "not taking a peer's answers: its clock is beyond the guard"),
                        (None, true) => tracing::info!(peer = %address, "a peer's answers are within the clock guard again"),
                        _ => {}
                    }
                    if let Some(ahead) = clock_ahead {
                        // Against the system clock: this clock reads it plus the lead, less
                        // the lag.
                        let clock = self.limiter.clock();
                        let from_system = clock.lead_us() as i64 - clock.lag_us() as i64;
                        peer.clock_offset_us =
                            Some((ahead.ahead_us as i64).saturating_add(from_system));
                        peer.clock_offset_seen = Some(std::time::Instant::now());
                    }
                    peer.answer_clock_refused = clock_ahead.is_some();
                    if let Some((node, replica, _)) = answer {
                        peer.node = Some(node.clone());
                        peer.replica = *replica;
                    }
                    peer.last_error = None;
                    peer.last_contact_us = Some(now);
                    peer.messages_sent += 1;
                }
            }
            peer.up = ok;
            // Whatever it did not take whole is sent again with the whole state.
            if !matches!(outcome, Ok((Some((_, _, true)), _))) {
                peer.in_sync = false;
            }
        });
        outcome
            .map(|(answer, _)| answer.and_then(|(_, replica, _)| replica))
            .map_err(|(_, why)| why)
    }

    /// `POST /v1/sync` of `message` to the replica at `address`, bound to it. Refused as not
    /// for it (`421`: another process answers there now, a restart), it asks who answers and
    /// sends once more, so that the message is not lost.
    async fn post_sync(
        &self,
        address: SocketAddr,
        message: &Outgoing,
    ) -> Result<reqwest::Response, String> {
        let Outgoing {
            body,
            timestamp,
            signature,
        } = message;
        let mut asked_again = false;
        loop {
            let recipient = self.recipient(address).await?;
            let _turn = self.turn(&address.to_string()).await;
            let headers =
                self.signed_headers("/v1/sync", *timestamp, signature, body.len(), recipient);
            let mut post = self
                .client
                .post(format!("{}://{address}/v1/sync", self.scheme));
            for (name, value) in headers {
                post = post.header(name, value);
            }
            let response = post
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status() == StatusCode::MISDIRECTED_REQUEST {
                self.forget_recipient(&address.to_string());
                if !asked_again && recipient.is_some() {
                    asked_again = true;
                    continue;
                }
                return Err("peer answered 421: the message is not for the replica there".into());
            }
            return Ok(response);
        }
    }

    /// Send each peer its messages (holding `entries` buckets in all), all peers concurrently;
    /// returns the replicas that took all of theirs, and the peers that did not, with why.
    async fn broadcast(
        self: &Arc<Self>,
        to: Vec<(SocketAddr, Arc<Vec<Outgoing>>, usize)>,
    ) -> (BTreeSet<u64>, Vec<(SocketAddr, Undelivered)>) {
        let mut sends = tokio::task::JoinSet::new();
        for (peer, messages, entries) in to {
            let replicator = self.clone();
            sends.spawn(async move {
                let delivered = async {
                    let mut replica = None;
                    for message in messages.iter() {
                        replica = replicator.send(peer, message).await?;
                    }
                    Ok(replica)
                }
                .await;
                (peer, entries, delivered)
            });
        }
        let mut answered = BTreeSet::new();
        let mut failed = Vec::new();
        let mut sent_entries = 0;
        for (peer, entries, delivered) in sends.join_all().await {
            match delivered {
                Ok(replica) => {
                    sent_entries += entries;
                    answered.extend(replica);
                }
                Err(why) => failed.push((peer, why)),
            }
        }
        self.limiter
            .metrics()
            .replication_entries
            .get_or_create(&DirectionLabels { direction: "sent" })
            .inc_by(sent_entries as u64);
        (answered, failed)
    }

    fn changed_buckets(&self) -> Vec<HeldBucket> {
        let mut buckets = Vec::new();
        self.limiter.store().drain_changes(&mut buckets);
        buckets
    }

    /// After a delta round: a peer that took it is owed nothing any more; one that did not is
    /// owed the round's buckets too (up to [`ReplicationOptions::max_missed`] over all peers),
    /// unless it refused the backlog the round carried, which is then given up.
    fn note_missed(
        &self,
        peers: &[SocketAddr],
        buckets: &[HeldBucket],
        owed: &HashMap<SocketAddr, Vec<HeldBucket>>,
        failed: &[(SocketAddr, Undelivered)],
    ) {
        let mut missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
        // Peers no longer in the set are owed nothing.
        missed.retain(|peer, _| peers.contains(peer));
        let mut remembered: usize = missed.values().map(|m| m.buckets.len()).sum();
        for &peer in peers {
            let Some(&(_, why)) = failed.iter().find(|(p, _)| *p == peer) else {
                match missed.get_mut(&peer) {
                    // The link is back: what it is owed goes with the next round.
                    Some(m) if m.unreachable => m.unreachable = false,
                    // It took what it was owed.
                    _ => drop(missed.remove(&peer)),
                }
                continue;
            };
            let m = missed.entry(peer).or_default();
            m.unreachable = true;
            if why == Undelivered::Refused && owed.get(&peer).is_some_and(|r| !r.is_empty()) {
                // It refused its backlog (too large for it, a clock beyond its guard, ...):
                // leave it to the whole-state round (the refusal put the peer out of sync)
                // rather than send it again after every round it takes. A backlog that did not
                // get through for a cut link is tried again once the link is back.
                remembered -= m.buckets.len();
                m.buckets.clear();
            }
            for (policy, key, _) in buckets {
                if remembered >= self.options.max_missed {
                    // The whole-state round it gets for having missed a message carries the
                    // rest.
                    break;
                }
                if m.buckets.insert((*policy, key.clone())) {
                    remembered += 1;
                }
            }
        }
    }

    fn all_buckets(&self) -> Vec<HeldBucket> {
        let mut buckets = Vec::new();
        self.limiter.store().for_each(|policy, key, state| {
            buckets.push((policy, CompactString::from(key), state.clone()))
        });
        buckets
    }

    /// One delta round: push what local decisions changed since the last round. While a
    /// policy is `strict` a round goes out even with no changes: it carries the escrow state,
    /// and its answers renew this replica's lease.
    pub async fn push_changes(self: &Arc<Self>, peers: &[SocketAddr]) {
        let strict = self.strict_active();
        if strict {
            self.escrow_tick();
        }
        // The escrow measures its leases on the steady clock, which never steps (clock.rs).
        let sent_at = self.limiter.clock().steady_now();
        if peers.is_empty() {
            if strict {
                self.escrow.round_answered(sent_at, &BTreeSet::new());
            }
            // No peer is owed anything any more.
            self.missed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            return;
        }
        let buckets = self.changed_buckets();
        // Peers owed buckets of rounds they missed, and, of those reachable last round, what
        // they are owed, as it is now (one copy per bucket: the round's own changes already
        // carry the newest state of theirs).
        let mut owed: HashMap<SocketAddr, Vec<HeldBucket>> = HashMap::new();
        {
            let missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
            let store = self.limiter.store();
            // Built only when some peer is owed something: the usual round owes nothing.
            let in_round: HashSet<(PolicyId, &str)> = if missed.is_empty() {
                HashSet::new()
            } else {
                buckets.iter().map(|(p, k, _)| (*p, k.as_str())).collect()
            };
            for &peer in peers {
                let Some(m) = missed.get(&peer) else { continue };
                let resend = if m.unreachable {
                    Vec::new()
                } else {
                    m.buckets
                        .iter()
                        .filter(|(p, k)| !in_round.contains(&(*p, k.as_str())))
                        .filter_map(|(p, k)| Some((*p, k.clone(), store.state(*p, k)?)))
                        .collect()
                };
                owed.insert(peer, resend);
            }
        }
        if buckets.is_empty() && !strict && owed.is_empty() {
            return;
        }
        // Each peer's deltas in the newest version it reads ([`delta_version`]): one encoding
        // per version some peer not owed a backlog needs.
        let versions: Vec<u32> = peers
            .iter()
            .map(|peer| {
                self.with_peer(&peer.to_string(), |status| {
                    delta_version(status.reads_version)
                })
            })
            .collect();
        let mut shared: Vec<(u32, Arc<Vec<Outgoing>>)> = Vec::new();
        for (peer, &version) in peers.iter().zip(&versions) {
            let owes_backlog = owed.get(peer).is_some_and(|r| !r.is_empty());
            if !owes_backlog && !shared.iter().any(|(v, _)| *v == version) {
                let messages = self.encode_chunked(false, &buckets, usize::MAX, version);
                shared.push((version, self.outgoing(messages)));
            }
        }
        // With nothing changed and no strict policy, only the peers owed something are sent
        // to (those unreachable last round get an empty message, which probes the link).
        let quiet = buckets.is_empty() && !strict;
        let to = peers
            .iter()
            .zip(versions)
            .filter(|(peer, _)| !quiet || owed.contains_key(peer))
            .map(
                |(&peer, version)| match owed.get(&peer).filter(|r| !r.is_empty()) {
                    Some(resend) => {
                        let mut all = Vec::with_capacity(buckets.len() + resend.len());
                        all.extend(buckets.iter().cloned());
                        all.extend(resend.iter().cloned());
                        // A backlog can be far larger than a round: in messages of at most
                        // a whole-state page's buckets each, every one under the size bound.
                        let messages = self.outgoing(self.encode_chunked(
                            false,
                            &all,
                            FULL_SYNC_CHUNK,
                            version,
                        ));
                        (peer, messages, all.len())
                    }
                    None => {
                        let (_, messages) = shared
                            .iter()
                            .find(|(v, _)| *v == version)
                            .expect("encoded for this peer");
                        (peer, messages.clone(), buckets.len())
                    }
                },
            )
            .collect();
        let (answered, failed) = self.broadcast(to).await;
        self.note_missed(peers, &buckets, &owed, &failed);
        if strict {
            // Follow what the answers brought before counting them toward the lease.
            self.escrow_tick();
            self.escrow.round_answered(sent_at, &answered);
        }
    }

    /// One anti-entropy round: the whole state, a page at a time (as `GET /v1/state` serves
    /// it, so that memory holds one page, not the state), to the peers that may have missed
    /// something, and a heartbeat to those that missed nothing ([`PeerStatus::in_sync`]).
    pub async fn push_everything(self: &Arc<Self>, peers: &[SocketAddr]) {
        let (whole, in_sync): (Vec<SocketAddr>, Vec<SocketAddr>) =
            peers.iter().partition(|&&peer| {
                self.with_peer(&peer.to_string(), |status| {
                    status.rounds_since_whole += 1;
                    let due = !status.in_sync || status.rounds_since_whole >= WHOLE_STATE_EVERY;
                    if due {
                        // Taken back by any message of this round it does not take whole.
                        status.in_sync = true;
                        status.rounds_since_whole = 0;
                    }
                    due
                })
            });
        if !in_sync.is_empty() {
            let heartbeat = self.outgoing(self.encode(false, &[]));
            let to = in_sync.iter().map(|&p| (p, heartbeat.clone(), 0)).collect();
            self.broadcast(to).await;
        }
        if whole.is_empty() {
            return;
        }
        let mut from = 0;
        loop {
            let (message, next, entries) = self.state_page(from);
            let page = self.outgoing(vec![message]);
            let to = whole.iter().map(|&p| (p, page.clone(), entries)).collect();
            self.broadcast(to).await;
            match next {
                Some(next) => from = next,
                None => return,
            }
        }
    }

    /// A JSON body signed as a peer message is.
    fn signed_response(&self, body: Vec<u8>) -> Response {
        let timestamp = self.limiter.now();
        let signature = self.sign(timestamp, &body);
        (
            [
                (TIMESTAMP_HEADER, timestamp.to_string()),
                (SIGNATURE_HEADER, signature),
                ("content-type", "application/json".to_owned()),
            ],
            body,
        )
            .into_response()
    }

    /// Pull every peer's whole state (start-up recovery). Returns how many peers answered.
    pub async fn pull_from(self: &Arc<Self>, peers: &[SocketAddr]) -> usize {
        let mut pulls = tokio::task::JoinSet::new();
        for &peer in peers {
            let replicator = self.clone();
            pulls.spawn(async move { replicator.pull(peer).await });
        }
        pulls.join_all().await.into_iter().filter(|ok| *ok).count()
    }

    /// Pull a peer's whole state, page by page (`GET /v1/state?from=`): each page is one
    /// signed message of at most the message bound, merged before the next is asked for, so
    /// memory stays at one page whatever the state's size.
    async fn pull(&self, address: SocketAddr) -> bool {
        let result: Result<(usize, usize), String> = async {
            let (mut from, mut changed, mut pages) = (0, 0, 0);
            loop {
                let recipient = self.recipient(address).await?;
                let _turn = self.turn(&address.to_string()).await;
                let (get, signature) =
                    self.signed_get(address, &format!("/v1/state?from={from}"), recipient);
                let response = get.send().await.map_err(|e| e.to_string())?;
                if response.status() == StatusCode::MISDIRECTED_REQUEST {
                    self.forget_recipient(&address.to_string());
                }
                if !response.status().is_success() {
                    return Err(format!("peer answered {}", response.status()));
                }
                let body = self.read_signed_answer(response, MAX_MESSAGE_BYTES).await?;
                let page: StatePage = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                // A page counts for the request it names only (an earlier version names none).
                match &page.re {
                    Some(re) if *re == signature => {}
                    None if self.options.legacy_signatures => {}
                    _ => return Err("state page not for this request".into()),
                }
                changed += self.apply(page.message).map_err(|e| e.to_string())?.changed;
                pages += 1;
                match page.next {
                    Some(next) if next > from => from = next,
                    Some(next) => return Err(format!("page {from} points back to {next}")),
                    None => return Ok((changed, pages)),
                }
            }
        }
        .await;
        match result {
            Ok((changed, pages)) => {
                tracing::info!(peer = %address, buckets = changed, pages, "pulled peer state");
                true
            }
            Err(e) => {
                tracing::warn!(peer = %address, error = %e, "could not pull peer state");
                self.with_peer(&address.to_string(), |peer| peer.last_error = Some(e));
                false
            }
        }
    }
}

/// A response body, refused as soon as it grows past `limit` (never read whole first).
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(format!("answer larger than {limit} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > limit {
            return Err(format!("answer larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A message to peers, signed once for all of them (over its timestamp and body); each request
/// adds the head signature bound to its recipient.
#[derive(Debug)]
struct Outgoing {
    body: Bytes,
    timestamp: Micros,
    signature: String,
}

/// An authenticated request body. Holds its part of the unverified-bytes budget until dropped
/// (the merge is done by then).
struct SignedBody {
    body: Bytes,
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl SignedBody {
    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// Why a peer message was refused (the `reason` label of `openclaw_peer_messages_rejected_total`).
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("message larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("protocol version {0} is not {PROTOCOL_VERSION} (or {PROTOCOL_VERSION_1})")]
    Incompatible(u32),
    #[error("{0}")]
    ClockAhead(ClockAhead),
    #[error("too many unauthenticated bytes held already; retry")]
    Busy,
    #[error("body not received within {BODY_DEADLINE:?}")]
    TooSlow,
    #[error("this signed message was taken already (a replay)")]
    Replayed,
    #[error("this signed message is for replica {0}, not this one")]
    Misdirected(u64),
    #[error("sender not certified: {0}")]
    NotCertified(String),
}

impl Rejection {
    fn reason(&self) -> &'static str {
        match self {
            Rejection::Unauthenticated(_) => "unauthenticated",
            Rejection::Malformed(_) => "malformed",
            Rejection::TooLarge => "too_large",
            Rejection::Incompatible(_) => "incompatible",
            Rejection::ClockAhead(_) => CLOCK_AHEAD_REASON,
            Rejection::Busy => "busy",
            Rejection::TooSlow => "too_slow",
            Rejection::Replayed => "replayed",
            Rejection::Misdirected(_) => "misdirected",
            Rejection::NotCertified(_) => "sender_not_certified",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Rejection::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Rejection::Malformed(_) => StatusCode::BAD_REQUEST,
            Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Incompatible(_) => StatusCode::CONFLICT,
            Rejection::ClockAhead(_) => StatusCode::CONFLICT,
            Rejection::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::TooSlow => StatusCode::REQUEST_TIMEOUT,
            Rejection::Replayed => StatusCode::CONFLICT,
            Rejection::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Rejection::NotCertified(_) => StatusCode::FORBIDDEN,
        }
    }
}

/// The peer listener's routes: `POST /v1/sync` (merge a message), `GET /v1/state` (send the
/// whole state, for a replica that starts empty), `POST /v1/lend` (lend tokens of a strict
/// sub-bucket to a replica short of them) and `GET /v1/hello` (who answers at this address,
/// which a peer binds its requests to).
pub fn peer_router(replicator: Arc<Replicator>) -> Router {
    Router::new()
        .route("/v1/sync", post(receive))
        .route("/v1/state", get(send_state))
        .route("/v1/lend", post(lend))
        .route("/v1/hello", get(hello))
        .with_state(replicator)
}

/// `GET /v1/hello`: this replica's node name and replica id, signed and naming the request,
/// so a peer can bind its requests to this replica. Signed like any peer request, taken once.
async fn hello(State(replicator): State<Arc<Replicator>>, headers: HeaderMap) -> Response {
    match replicator.verify_get(&headers, HELLO_PATH, false) {
        Ok(re) => replicator.signed_response(
            serde_json::to_vec(&Hello {
                node: replicator.limiter.node_id().to_owned(),
                replica: replicator.limiter.store().replica().0,
                v: BINARY_VERSION,
                re,
            })
            .expect("serializing plain data cannot fail"),
        ),
        Err(rejection) => refuse(&replicator, rejection),
    }
}

fn refuse(replicator: &Replicator, rejection: Rejection) -> Response {
    replicator
        .limiter
        .metrics()
        .peer_rejected
        .get_or_create(&ReasonLabels {
            reason: rejection.reason(),
        })
        .inc();
    // Clock refusals are logged once per peer where they are decided (`Replicator::apply`).
    if !matches!(rejection, Rejection::ClockAhead(_)) {
        tracing::warn!(error = %rejection, "refused a peer message");
    }
    (
        rejection.status(),
        [(REFUSAL_HEADER, rejection.reason())],
        rejection.to_string(),
    )
        .into_response()
}

/// The client certificate of the connection a request came on, when the listener serves TLS
/// (`ConnectInfo` of [`crate::listener::LimitedListener`]; absent on a plain listener).
type Connection = Option<Extension<ConnectInfo<ClientCertificate>>>;

fn certificate_of(connection: &Connection) -> Option<&ClientCertificate> {
    connection
        .as_ref()
        .map(|Extension(ConnectInfo(certificate))| certificate)
}

/// The server certificate an answer came over, when the client keeps it (nodes bound).
fn server_certificate(response: &reqwest::Response) -> Option<CertificateDer<'static>> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()?
        .peer_certificate()
        .map(|der| CertificateDer::from(der.to_vec()))
}

async fn receive(
    State(replicator): State<Arc<Replicator>>,
    connection: Connection,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let signed = replicator
            .read_signed(&headers, body, MAX_MESSAGE_BYTES, "/v1/sync")
            .await?;
        let body = signed.body();
        replicator
            .limiter
            .metrics()
            .replication_bytes
            .get_or_create(&DirectionLabels {
                direction: "received",
            })
            .inc_by(body.len() as u64);
        replicator.decode_and_apply(body, certificate_of(&connection))
    }
    .await;
    match result {
        // The answer names this node, so the sender can show which node an address is; it is
        // signed, and names the request it answers (its signature), so that it counts for
        // that request only.
        Ok(applied) => {
            let answer = SyncAnswer {
                node: replicator.limiter.node_id().to_owned(),
                merged: applied.changed,
                complete: applied.complete,
                replica: Some(replicator.limiter.store().replica().0),
                escrow: replicator.escrow_control(),
                re: header(&headers, SIGNATURE_HEADER).map(str::to_owned),
                sent_at: Some(replicator.limiter.now()),
            };
            replicator.signed_response(
                serde_json::to_vec(&answer).expect("serializing plain data cannot fail"),
            )
        }
        Err(rejection) => refuse(&replicator, rejection),
    }
}

/// Lend part of a strict sub-bucket to the peer asking. Validated first; a policy this replica
/// does not hold as strict, or holds with another rate for the key, lends nothing.
async fn lend(
    State(replicator): State<Arc<Replicator>>,
    connection: Connection,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let signed = replicator
            .read_signed(&headers, body, MAX_LEND_BYTES, "/v1/lend")
            .await?;
        let request: LendRequest = serde_json::from_slice(signed.body())
            .map_err(|e| Rejection::Malformed(e.to_string()))?;
        if request.v != LEND_VERSION {
            return Err(Rejection::Incompatible(request.v));
        }
        if request.replica == replicator.limiter.store().replica().0 {
            return Err(Rejection::Malformed(
                "loan asked by this replica itself".into(),
            ));
        }
        replicator.check_borrower(certificate_of(&connection), request.replica)?;
        if request.key.is_empty() || request.key.len() > crate::http::MAX_KEY_BYTES {
            return Err(Rejection::Malformed("key length out of range".into()));
        }
        if request.wanted < 0
            || request.give < 0
            || (request.wanted == 0 && request.room <= 0 && request.give == 0)
        {
            return Err(Rejection::Malformed("a loan of nothing".into()));
        }
        Ok(replicator.lend_for(&request))
    }
    .await;
    match result {
        Ok(answer) => replicator.signed_response(
            serde_json::to_vec(&answer).expect("serializing plain data cannot fail"),
        ),
        Err(rejection) => refuse(&replicator, rejection),
    }
}

/// `GET /v1/state?from=SHARD`: one page of the whole state (signed as `StatePage`; the request
/// signs its path). Without `from`: the whole state as one signed array of messages, for
/// replicas of an earlier version (bounded by the message size, which is why pages exist).
async fn send_state(
    State(replicator): State<Arc<Replicator>>,
    Query(query): Query<StateQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(from) = query.from {
        let re = match replicator.verify_get(&headers, &state_path(from), true) {
            Ok(re) => re,
            Err(rejection) => return refuse(&replicator, rejection),
        };
        let (message, next, _) = replicator.state_page(from);
        // `{"next": ..., "re": ..., "message": <the message as encoded>}`: the message is
        // spliced in, not decoded and encoded again.
        let mut body = Vec::with_capacity(message.len() + 120);
        body.extend_from_slice(b"{\"next\":");
        body.extend_from_slice(
            serde_json::to_string(&next)
                .expect("serializing plain data cannot fail")
                .as_bytes(),
        );
        body.extend_from_slice(format!(",\"re\":\"{re}\"").as_bytes());
        body.extend_from_slice(b",\"message\":");
        body.extend_from_slice(&message);
        body.push(b'}');
        return replicator.signed_response(body);
    }
    // Earlier versions' form signs an empty path and no recipient: taken in legacy mode only.
    if let Err(rejection) = replicator.verify_get(&headers, "", true) {
        return refuse(&replicator, rejection);
    }
    let buckets = replicator.all_buckets();
    let messages = replicator.encode(true, &buckets);
    // A JSON array of messages, signed as one body.
    let mut body =
        Vec::with_capacity(messages.iter().map(Vec::len).sum::<usize>() + messages.len() + 2);
    body.push(b'[');
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message);
    }
    body.push(b']');
    replicator.signed_response(body)
}

/// The query of `GET /v1/state`.
#[derive(Debug, Deserialize)]
struct StateQuery {
    from: Option<usize>,
}

/// One page of `GET /v1/state?from=`.
#[derive(Debug, Deserialize)]
struct StatePage<'a> {
    next: Option<usize>,
    /// The signature of the request answered.
    #[serde(default)]
    re: Option<String>,
    #[serde(borrow)]
    message: SyncMessage<'a>,
}

/// What a paged state request signs in place of a body: its path, so that a signature made
/// for one page is good for no other.
fn state_path(from: usize) -> String {
    format!("GET /v1/state?from={from}")
}

/// The sender loop: a delta round every sync interval, a full round every anti-entropy
/// interval, to whatever peers discovery currently reports.
pub async fn run(
    replicator: Arc<Replicator>,
    mut peers: watch::Receiver<Vec<SocketAddr>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sync = tokio::time::interval(replicator.options.sync_interval);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut anti_entropy = tokio::time::interval(replicator.options.anti_entropy_interval);
    anti_entropy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Vec<SocketAddr> = peers.borrow_and_update().clone();
    replicator.set_peers(&current);
    // `changed()` rather than `wait_for()`: the latter's guard is not `Send` across the awaits
    // in the other arms. The flag only ever goes from false to true.
    while !*stop.borrow_and_update() {
        tokio::select! {
            _ = sync.tick() => replicator.push_changes(&current).await,
            _ = anti_entropy.tick() => replicator.push_everything(&current).await,
            changed = peers.changed() => {
                // Discovery ends when the process stops: its sender is dropped at the same
                // moment the stop flag is set. Either way the hand-off below must run (a
                // `return` here lost the last changes of about half the graceful stops).
                if changed.is_err() {
                    break;
                }
                let next = peers.borrow_and_update().clone();
                let joined: Vec<SocketAddr> = next.iter().filter(|p| !current.contains(p)).copied().collect();
                tracing::info!(peers = ?next, "peer set changed");
                current = next;
                replicator.set_peers(&current);
                // A new peer gets everything now rather than at the next anti-entropy round.
                if !joined.is_empty() {
                    replicator.push_everything(&joined).await;
                }
            }
            result = stop.changed() => if result.is_err() { break },
        }
    }
    // Hand off: whatever changed since the last round goes out before we exit, with this
    // replica's escrow shares given up, so peers need not wait out its lease.
    replicator.escrow.retire();
    replicator.push_changes(&current).await;
}

/// Counts a background task while it runs (also when it panics or is cancelled).
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn start(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A loan request's nonce: unpredictable, so a recorded answer cannot be passed off as the
/// answer to a later request.
fn loan_nonce() -> u64 {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source works");
    u64::from_le_bytes(bytes)
}

/// A request header's value, when it is present and text.
fn header(headers: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod test_support {
    use super::*;
    use crate::bucket::Rate;
    use crate::clock::WallClock;
    use crate::peer_tls::PeerTls;
    use crate::service::LimiterOptions;

    /// The replicator of node `me` as replica `replica` on the wall clock, signing with
    /// `secret`, with `tls` when given; the defaults of a 50 ms sync round otherwise.
    pub(super) fn test_replicator(
        replica: u64,
        secret: &[u8],
        tls: Option<Arc<PeerTls>>,
    ) -> Replicator {
        // The replication client is built with `rustls-no-provider`: main installs ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let limiter = Arc::new(Limiter::new(LimiterOptions {
            node_id: "me".into(),
            replica: ReplicaId(replica),
            default_rate: Rate::try_new(10, 1000).unwrap(),
            clock: Arc::new(WallClock::new()),
            shards: 2,
            track_changes: true,
        }));
        Replicator::try_new(
            limiter,
            ReplicationOptions {
                secret: secret.to_vec(),
                tls,
                sync_interval: Duration::from_millis(50),
                anti_entropy_interval: Duration::from_secs(5),
                request_timeout: Duration::from_secs(1),
                strict: Params::default(),
                clock_guard: Duration::from_millis(500),
                loan_timeout: Duration::from_millis(25),
                unverified_budget: UNVERIFIED_BUDGET,
                legacy_signatures: false,
                max_buckets: DEFAULT_MAX_BUCKETS,
                max_requests_per_peer: 32,
                max_missed: DEFAULT_MAX_MISSED,
            },
        )
        .unwrap()
    }
}

/// The forms of a delta: versions 2, 3 and 4 carry the same buckets, and a binary body is
/// taken only when it is exactly one message of version 4.
#[cfg(test)]
mod wire_tests {
    use super::test_support::test_replicator;
    use super::*;

    /// Every bucket `replicator` holds, by key.
    fn held(replicator: &Replicator) -> BTreeMap<String, BucketState> {
        let mut held = BTreeMap::new();
        replicator
            .limiter
            .store()
            .for_each(|_, key, state| drop(held.insert(key.to_owned(), state.clone())));
        held
    }

    /// A sender holding buckets of one and of two components (one merged from a peer), some
    /// claims listing a component and some not.
    fn sender() -> Replicator {
        let sender = test_replicator(2, b"secret", None);
        for key in 0..50 {
            let key = format!("client-{key:03}-\u{e9}\"quoted\"");
            sender
                .limiter
                .decide("default", &key, 1 + key.len() as u64 % 4)
                .unwrap();
        }
        let now = sender.limiter.now();
        let peer = format!(
            r#"{{"v":3,"node":"peer","replica":7,"sent_at":{now},"full":false,"policies":["default"],"replicas":[7,2],"entries":[[0,"client-007-\u00e9\"quoted\"",-20,0,[[0,-30,2,null]]],[0,"only-peer",-10,0,[[0,-40,3,1]]]]}}"#
        );
        sender.merge_authenticated(peer.as_bytes()).unwrap();
        sender
    }

    #[test]
    fn each_version_of_a_round_leaves_its_reader_holding_what_the_sender_holds() {
        let sender = sender();
        let buckets = sender.all_buckets();
        let expected = held(&sender);
        assert_eq!(expected.len(), 51);
        assert!(expected.values().any(|state| state.components().len() == 2));
        let mut sizes = Vec::new();
        for (reader, version) in [
            (3, PROTOCOL_VERSION),
            (4, COMPACT_VERSION),
            (5, BINARY_VERSION),
        ] {
            let reader = test_replicator(reader, b"secret", None);
            let messages = sender.encode_chunked(false, &buckets, usize::MAX, version);
            assert_eq!(messages.len(), 1);
            assert_eq!(is_binary(&messages[0]), version == BINARY_VERSION);
            sizes.push(messages[0].len());
            assert_eq!(
                reader.merge_authenticated(&messages[0]),
                Ok(51),
                "version {version}"
            );
            assert_eq!(held(&reader), expected, "version {version}");
        }
        // Each version is smaller than the one before it.
        assert!(sizes[0] > sizes[1] && sizes[1] > sizes[2], "{sizes:?}");
        // In chunks, each read on its own.
        let reader = test_replicator(6, b"secret", None);
        let chunks = sender.encode_chunked(true, &buckets, 7, BINARY_VERSION);
        assert_eq!(chunks.len(), 8);
        for chunk in &chunks {
            reader.merge_authenticated(chunk).unwrap();
        }
        assert_eq!(held(&reader), expected);
    }

    #[test]
    fn a_binary_body_is_taken_only_whole_and_in_version_4() {
        let sender = sender();
        let buckets = sender.all_buckets();
        let body = sender
            .encode_chunked(false, &buckets, usize::MAX, BINARY_VERSION)
            .remove(0);
        let reader = test_replicator(3, b"secret", None);
        // Every strict prefix, and the body with a byte after it, is refused, nothing merged.
        for cut in 1..body.len() {
            assert!(
                matches!(
                    reader.decode_and_apply(&body[..cut], None),
                    Err(Rejection::Malformed(_))
                ),
                "a body cut at {cut} of {} was taken",
                body.len()
            );
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(matches!(
            reader.decode_and_apply(&longer, None),
            Err(Rejection::Malformed(_))
        ));
        // Another version in the first byte: a version this build does not read.
        let mut other = body.clone();
        other[0] = 5;
        assert!(matches!(
            reader.decode_and_apply(&other, None),
            Err(Rejection::Incompatible(5))
        ));
        assert!(held(&reader).is_empty());
        // A component list declaring four billion components, in a body of a few bytes:
        // refused as malformed.
        let mut huge = Vec::new();
        huge.extend([4, 1, b'p', 9, 0, 0, 1, 1, b'd', 1]); // v, node, replica, stamp, full, policies
        huge.extend([0, 1, b'k', 0, 0]); // entry: policy, key, epoch, rebaser
        huge.extend([0xff, 0xff, 0xff, 0xff, 0x0f]); // components: u32::MAX of them
        huge.extend([0, 0, 1, 0]); // the first of them
        assert!(matches!(
            reader.decode_and_apply(&huge, None),
            Err(Rejection::Malformed(_))
        ));
        // The whole body is taken.
        assert_eq!(reader.merge_authenticated(&body), Ok(51));
        assert_eq!(held(&reader), held(&sender));
    }

    #[test]
    fn escrow_state_crosses_the_binary_form_unchanged() {
        let now = test_replicator(2, b"secret", None).limiter.now();
        let json = format!(
            r#"{{"v":3,"node":"peer","replica":5,"sent_at":{now},"full":false,"policies":[],"entries":[],"escrow":{{"allocation":null,"records":{{"5":{{"seq":3,"acked":null,"retired":false,"demand":{{"default":4}},"expired":null}}}}}}}}"#
        );
        let binary = binary_from_json(json.as_bytes()).unwrap();
        let from_json: SyncMessage = serde_json::from_slice(json.as_bytes()).unwrap();
        let from_binary = decode_binary(&binary).map_err(|e| e.to_string()).unwrap();
        assert_eq!(from_binary.escrow, from_json.escrow);
        assert!(from_binary.escrow.is_some());
        // Escrow text that is not a control state refuses the message.
        let mut broken = binary.clone();
        let at = broken.windows(6).position(|w| w == b"demand").unwrap();
        broken[at] = b'"';
        assert!(matches!(
            decode_binary(&broken),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn a_peer_gets_deltas_in_the_newest_version_both_read() {
        for (announced, sent) in [
            (0, PROTOCOL_VERSION),
            (PROTOCOL_VERSION_1, PROTOCOL_VERSION),
            (PROTOCOL_VERSION, PROTOCOL_VERSION),
            (COMPACT_VERSION, COMPACT_VERSION),
            (BINARY_VERSION, BINARY_VERSION),
            (BINARY_VERSION + 1, BINARY_VERSION),
        ] {
            assert_eq!(delta_version(announced), sent, "announced {announced}");
        }
    }
}

/// Work a request on another runtime hands to the replicator's (`Replicator::run_at_home`):
/// a loan whose request went away (Envoy gave up on the call) is not dropped with it.
#[cfg(test)]
mod run_at_home_tests {
    use super::test_support::test_replicator;
    use super::*;

    /// The outputs `run_at_home` gave to `unclaimed`.
    type Unclaimed = Arc<Mutex<Vec<u32>>>;

    /// A replicator, what it hands on, and a release for the task (its sender, its receiver).
    fn setup() -> (
        Replicator,
        Unclaimed,
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let replicator = test_replicator(1, b"secret", None);
        let (release, released) = tokio::sync::oneshot::channel();
        (replicator, Arc::default(), release, released)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_nobody_waits_for_any_more_goes_to_unclaimed() {
        let (replicator, unclaimed, release, released) = setup();
        let got = unclaimed.clone();
        let waiting = replicator.run_at_home(
            async move {
                let _ = released.await;
                7u32
            },
            move |v| got.lock().unwrap().push(v),
        );
        // Polled once, so the task runs; then the caller goes away before it answers.
        assert!(
            tokio::time::timeout(Duration::ZERO, waiting).await.is_err(),
            "the task waits for its release"
        );
        assert!(unclaimed.lock().unwrap().is_empty());
        release.send(()).unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while unclaimed.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < until, "never handed on");
            tokio::task::yield_now().await;
        }
        assert_eq!(*unclaimed.lock().unwrap(), vec![7]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_sent_but_not_read_before_the_caller_went_away_goes_to_unclaimed() {
        let (replicator, unclaimed, release, released) = setup();
        let (answered, sent) = tokio::sync::oneshot::channel();
        let got = unclaimed.clone();
        let mut waiting = Box::pin(replicator.run_at_home(
            async move {
                let _ = released.await;
                // Told once the output is returned; the runtime sends it right after.
                let _ = answered.send(());
                9u32
            },
            move |v| got.lock().unwrap().push(v),
        ));
        assert!(
            tokio::time::timeout(Duration::ZERO, waiting.as_mut())
                .await
                .is_err()
        );
        release.send(()).unwrap();
        sent.await.unwrap();
        // The task's send and this drop race: either side hands the answer on, exactly once.
        drop(waiting);
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while unclaimed.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < until, "never handed on");
            tokio::task::yield_now().await;
        }
        // Once: the oneshot hands the answer to exactly one side (the task's failed send, or
        // this drop's read).
        assert_eq!(*unclaimed.lock().unwrap(), vec![9]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_read_is_not_handed_on() {
        let (replicator, unclaimed, release, released) = setup();
        let got = unclaimed.clone();
        release.send(()).unwrap();
        let output = replicator
            .run_at_home(
                async move {
                    let _ = released.await;
                    3u32
                },
                move |v| got.lock().unwrap().push(v),
            )
            .await;
        assert_eq!(output, Some(3));
        assert!(unclaimed.lock().unwrap().is_empty());
    }
}

/// Peers whose clock is beyond the guard, one way or the other: their answers, and who this
/// replica goes on without (the end-to-end cases, real processes with libfaketime, are
/// `tests/tests/clock_offsets.rs`).
#[cfg(test)]
mod clock_guard_tests {
    use super::test_support::test_replicator;
    use super::*;

    fn answer_sent_at(sent_at: Option<Micros>) -> SyncAnswer {
        SyncAnswer {
            node: "peer".into(),
            merged: 0,
            complete: true,
            replica: Some(2),
            escrow: None,
            re: None,
            sent_at,
        }
    }

    fn answers_refused(replicator: &Replicator) -> u64 {
        replicator
            .limiter
            .metrics()
            .peer_clock_refused
            .get_or_create(&ReasonLabels {
                reason: "answer_ahead",
            })
            .get()
    }

    #[test]
    fn an_answer_from_beyond_the_clock_guard_is_not_taken_and_is_counted() {
        let replicator = test_replicator(1, b"a test secret of enough bytes", None);
        let now = replicator.limiter.now();
        let ahead = replicator
            .answer_clock_ahead(&answer_sent_at(Some(now + 2_000_000)))
            .expect("2 s ahead is beyond a 500 ms guard");
        assert!(ahead.ahead_us > 1_900_000, "{ahead}");
        assert_eq!(answers_refused(&replicator), 1);
        // Not followed: the clock did not jump toward it.
        assert!(replicator.limiter.now() < now + 1_000_000);
    }

    #[test]
    fn an_answer_within_the_guard_or_without_a_time_is_taken() {
        let replicator = test_replicator(1, b"a test secret of enough bytes", None);
        let now = replicator.limiter.now();
        for sent_at in [Some(now + 100_000), Some(now - 5_000_000), None] {
            assert!(
                replicator
                    .answer_clock_ahead(&answer_sent_at(sent_at))
                    .is_none(),
                "{sent_at:?} refused"
            );
        }
        assert_eq!(answers_refused(&replicator), 0);
    }

    /// `peers` peers named `p1`.. whose clocks were last seen `ahead_ms[i]` ahead of this
    /// replica's system clock, `ago` before now.
    fn with_clocks(ahead_ms: &[i64], ago: Duration) -> Replicator {
        let replicator = test_replicator(1, b"a test secret of enough bytes", None);
        let seen = std::time::Instant::now().checked_sub(ago).unwrap();
        for (i, &ms) in ahead_ms.iter().enumerate() {
            replicator.with_peer(&format!("127.0.0.1:{}", i + 1), |peer| {
                peer.node = Some(format!("p{}", i + 1));
                peer.clock_offset_us = Some(ms * 1000);
                peer.clock_offset_seen = Some(seen);
            });
        }
        replicator
    }

    #[test]
    fn a_replica_behind_a_majority_of_the_cluster_beyond_the_guard_follows_it() {
        // Both peers of three replicas 2 s ahead: this replica's clock is the wrong one.
        let behind = with_clocks(&[2_000, 2_100], Duration::ZERO);
        let now = behind.limiter.now();
        assert!(
            behind
                .answer_clock_ahead(&answer_sent_at(Some(now + 2_050_000)))
                .is_none(),
            "refused although a majority runs there"
        );
        let moved = behind.limiter.now() - now;
        assert!(
            (1_990_000..2_600_000).contains(&moved),
            "moved {moved} µs, not to the majority's 2 s"
        );
        assert_eq!(answers_refused(&behind), 0);
        // Beyond the guard of that timeline, still refused.
        assert!(
            behind
                .answer_clock_ahead(&answer_sent_at(Some(behind.limiter.now() + 900_000)))
                .is_some()
        );
    }

    #[test]
    fn a_replica_ahead_of_a_majority_of_the_cluster_beyond_the_guard_falls_back_to_it() {
        // Both peers of three replicas 2 s behind: this replica's clock is the fast one. It
        // slows down (never steps back) until it runs 2 s behind its system clock.
        let ahead = with_clocks(&[-2_000, -2_100], Duration::ZERO);
        let before = ahead.limiter.now();
        assert!(
            ahead
                .answer_clock_ahead(&answer_sent_at(Some(before - 2_000_000)))
                .is_none()
        );
        assert_eq!(ahead.limiter.clock().lag_us(), 2_000_000);
        assert!(ahead.limiter.now() >= before, "stepped back");
        assert!(ahead.limiter.now() < before + 100_000, "did not slow down");
    }

    #[test]
    fn a_minority_ahead_or_an_old_or_a_lone_offset_does_not_move_a_replica_beyond_the_guard() {
        for (ahead_ms, ago, what) in [
            (&[2_000, 0][..], Duration::ZERO, "one of two peers ahead"),
            (
                &[2_000, 2_000, 0, 0][..],
                Duration::ZERO,
                "two of four ahead",
            ),
            (
                &[2_000, 2_000][..],
                Duration::from_secs(60),
                "offsets a minute old",
            ),
            (
                &[2_000][..],
                Duration::ZERO,
                "the only peer ahead (two replicas)",
            ),
            (&[-2_000, 0][..], Duration::ZERO, "one of two peers behind"),
            (
                &[-2_000, 2_000][..],
                Duration::ZERO,
                "one peer behind, one ahead",
            ),
        ] {
            let replicator = with_clocks(ahead_ms, ago);
            let now = replicator.limiter.now();
            assert!(
                replicator
                    .answer_clock_ahead(&answer_sent_at(Some(now + 2_000_000)))
                    .is_some(),
                "{what}: followed"
            );
            assert!(
                replicator.limiter.now() < now + 1_000_000,
                "{what}: the clock jumped"
            );
            assert_eq!(
                replicator.limiter.clock().lag_us(),
                0,
                "{what}: fell behind"
            );
        }
    }

    /// `peers` peers at addresses 127.0.0.1:1.., replica ids 101.., all up; `mark` flags some.
    fn with_peers(peers: u16, mark: impl Fn(u16, &mut PeerStatus)) -> Replicator {
        let replicator = test_replicator(1, b"a test secret of enough bytes", None);
        for i in 1..=peers {
            replicator.with_peer(&format!("127.0.0.1:{i}"), |peer| {
                peer.up = true;
                peer.replica = Some(100 + u64::from(i));
                mark(i, peer);
            });
        }
        // A peer known by its messages only (no address) does not count as a member.
        replicator.with_peer("node:someone", |peer| peer.up = true);
        replicator
    }

    #[test]
    fn a_replica_goes_on_without_a_minority_its_clock_is_separated_from() {
        // One of two peers refuses our messages for our clock, and we do not take the other's
        // answers: two of three members separated, we are the odd one out.
        let odd = with_peers(2, |i, peer| {
            peer.refuses_our_clock = i == 1;
            peer.answer_clock_refused = i == 2;
        });
        assert!(!odd.clock_separation().in_majority);
        assert!(odd.refuses_our_clock(101) && !odd.refuses_our_clock(102));

        // One of two peers separated: we and the other are the majority, and the separated
        // one is not heard from in the escrow protocol.
        let majority = with_peers(2, |i, peer| peer.refuses_our_clock = i == 2);
        assert!(majority.clock_separation().in_majority);
        assert!(majority.refuses_our_clock(102) && !majority.refuses_our_clock(101));

        // Two members, one separated: neither side is a majority.
        let pair = with_peers(1, |_, peer| peer.answer_clock_refused = true);
        assert!(!pair.clock_separation().in_majority);

        // Nothing separated, or no peers at all.
        assert!(with_peers(4, |_, _| {}).clock_separation().in_majority);
        assert!(with_peers(0, |_, _| {}).clock_separation().in_majority);
    }
}

/// The sender binding of `OPENCLAW_PEER_TLS_BIND_NODE`, decided on certificates as the peer
/// listener and the replication client hand them over (the end-to-end case, real processes
/// and handshakes, is `tests/tests/peer_mtls.rs`).
#[cfg(test)]
mod binding_tests {
    use super::test_support::test_replicator;
    use super::*;
    use crate::peer_tls::test_certs::Ca;
    use crate::peer_tls::{DEFAULT_SERVER_NAME, PeerTls, PeerTlsSettings, ReloadCounters};
    use rustls::pki_types::ServerName;
    use rustls::pki_types::pem::PemObject;

    const ME: u64 = 1;

    /// The replicator of node `me`, replica [`ME`], with nodes bound, its certificate from `ca`.
    fn bound(ca: &Ca, dir: &std::path::Path) -> Replicator {
        let files = ca.write(
            dir,
            &ca.leaf_for(&[DEFAULT_SERVER_NAME, "me.openclaw-peer"]),
        );
        let tls = PeerTls::try_new(
            PeerTlsSettings {
                files,
                server_name: ServerName::try_from(DEFAULT_SERVER_NAME).unwrap(),
                reload: Duration::from_secs(5),
                bind_node: Some("me".into()),
            },
            ReloadCounters::default(),
        )
        .unwrap();
        test_replicator(ME, MTLS_ONLY_KEY, Some(Arc::new(tls)))
    }

    /// A peer certificate from `ca` naming `node`, as a peer presents it.
    fn certificate_of_node(ca: &Ca, node: &str) -> CertificateDer<'static> {
        let (pem, _) = ca.leaf_for(&[DEFAULT_SERVER_NAME, &format!("{node}.openclaw-peer")]);
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn refused(result: Result<(), Rejection>) -> String {
        match result {
            Err(rejection @ Rejection::NotCertified(_)) => rejection.to_string(),
            other => panic!("not refused as not certified: {other:?}"),
        }
    }

    #[test]
    fn a_message_is_taken_only_from_the_node_its_certificate_names() {
        let (ca, dir) = (Ca::new("peers"), tempfile::tempdir().unwrap());
        let replicator = bound(&ca, dir.path());
        let c = ClientCertificate::presented(certificate_of_node(&ca, "node-c"));

        let said = refused(replicator.check_sender(Some(&c), "node-a", 5));
        assert!(said.contains("\"node-a\""), "{said}");
        refused(replicator.check_sender(None, "node-c", 5));
        refused(replicator.check_sender(Some(&ClientCertificate::default()), "node-c", 5));
        replicator.check_sender(Some(&c), "node-c", 5).unwrap();

        // Replica 5 is node-c's now: node-d, certified as itself, cannot send as it.
        let d = ClientCertificate::presented(certificate_of_node(&ca, "node-d"));
        let said = refused(replicator.check_sender(Some(&d), "node-d", 5));
        assert!(said.contains("belongs to node \"node-c\""), "{said}");
        replicator.check_sender(Some(&d), "node-d", 6).unwrap();
        // This replica's own id is never bound to another node (apply refuses the message).
        replicator.check_sender(Some(&d), "node-d", ME).unwrap();
        assert_eq!(
            replicator.bindings.lock().unwrap().node_of(ME),
            None,
            "this replica's id taken as node-d's"
        );
    }

    #[test]
    fn a_loan_is_lent_only_to_the_node_that_owns_the_borrowing_id() {
        let (ca, dir) = (Ca::new("peers"), tempfile::tempdir().unwrap());
        let replicator = bound(&ca, dir.path());
        let c = ClientCertificate::presented(certificate_of_node(&ca, "node-c"));
        let d = ClientCertificate::presented(certificate_of_node(&ca, "node-d"));
        let said = refused(replicator.check_borrower(Some(&c), 5));
        assert!(said.contains("has not been heard from"), "{said}");
        replicator.check_sender(Some(&c), "node-c", 5).unwrap();
        replicator.check_borrower(Some(&c), 5).unwrap();
        refused(replicator.check_borrower(Some(&d), 5));
        refused(replicator.check_borrower(None, 5));
    }

    #[test]
    fn an_answer_counts_only_from_the_node_its_certificate_names_under_that_nodes_id() {
        let (ca, dir) = (Ca::new("peers"), tempfile::tempdir().unwrap());
        let replicator = bound(&ca, dir.path());
        let c = certificate_of_node(&ca, "node-c");
        let d = certificate_of_node(&ca, "node-d");
        assert!(replicator.answered_by(Some(&c), "node-c", Some(5)));
        assert!(replicator.answered_by(Some(&c), "node-c", None));
        assert!(!replicator.answered_by(Some(&c), "node-a", Some(7)));
        assert!(!replicator.answered_by(None, "node-c", Some(5)));
        // Node d answering as replica 5, node c's: not counted.
        assert!(!replicator.answered_by(Some(&d), "node-d", Some(5)));
        assert!(replicator.answered_by(Some(&d), "node-d", Some(6)));
    }
}
