//! The write steps of the pipeline: send a write to its primary (and, for the 43
//! transactional RPCs, to every up-to-date healthy secondary at once, each with its own
//! `gitaly-reference-transaction` metadata so that the nodes vote back), give the client the
//! primary's answer, and record what the write did once every node is done.
//!
//! A write is detached from the client: the primary's call runs in a task of its own, so a
//! client that resets the stream, drops the connection or lets its deadline pass does not
//! leave a write the node applied unrecorded. (A client-streaming request still ends when the
//! client's stream does; the node then fails the call, and the votes tell whether it changed
//! anything.) A secondary's failure is logged and takes its voter out of the transaction; it
//! never fails the client's call. Secondaries' answers are read and dropped.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;

use super::error::ProxyError;
use super::finalize::{self, broken, call_status};
use super::forward;
use super::layers::correlation_id;
use super::request_body;
use super::route::{Destination, PlannedWrite};
use super::state::Proxy;
use crate::datastore::Datastore;
use crate::nodes::NodeChannel;
use crate::routing::registry::MethodInfo;
use crate::routing::WriteRoute;
use crate::transactions::outcome::{self, CallStatus, Decision};
use crate::transactions::{voters_for, Registration};
use crate::wire::transaction::{TransactionMetadata, METADATA_KEY as TRANSACTION_KEY};

type Response = http::Response<tonic::body::Body>;

/// How long secondaries may take to finish after the primary did, before they are cut off
/// and left outdated (the bookkeeping as a whole has 30 s).
const SECONDARY_GRACE: Duration = Duration::from_secs(10);

/// A write call as the pipeline read it.
pub struct WriteCall<'a> {
    pub method: &'static MethodInfo,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    pub extensions: &'a http::Extensions,
    /// The client's sidechannel id, if it asked for one (read once, by the pipeline).
    pub sidechannel: Option<u64>,
    /// What followed the first message in its chunk.
    pub rest: Bytes,
    pub body: BodyStream<tonic::body::Body>,
}

impl Proxy {
    /// Sends a planned write and answers with the primary's response, recorded before the
    /// client sees its trailers.
    pub async fn forward_write(
        &self,
        call: WriteCall<'_>,
        write: PlannedWrite,
    ) -> Result<Response, ProxyError> {
        let PlannedWrite {
            transactional,
            participants,
            route,
        } = write;
        let mut headers = call.headers;
        let correlation_id = correlation_id(&headers);
        // Before any node gets the call: a refused sidechannel must not leave secondaries
        // running. Only the primary's copy keeps the sidechannel id (removed below).
        self.bridge_sidechannel(call.sidechannel, &mut headers, call.extensions)?;
        let registration = if transactional {
            Some(self.register(&participants)?)
        } else {
            None
        };
        let messages: Vec<&[u8]> = participants.iter().map(|(_, m)| m.as_slice()).collect();
        let bodies = request_body::for_each(
            call.method.client_streaming,
            &messages,
            call.rest,
            call.body,
        );
        let mut bodies = bodies.into_iter();
        let mut participants = participants.into_iter();
        let (Some((primary, _)), Some(primary_body)) = (participants.next(), bodies.next()) else {
            return Err(crate::routing::RoutingError::NoSuitableNode.into());
        };
        let voting = registration.map(|registration| {
            let secondaries = participants
                .zip(bodies)
                .map(|((destination, _), body)| {
                    let mut headers = headers.clone();
                    // Only the primary talks to the client over a sidechannel.
                    headers.remove(crate::wire::header_names::SIDECHANNEL_ID);
                    let storage = destination.storage.clone();
                    let task = self.spawn_secondary(
                        &registration,
                        call.uri.clone(),
                        headers,
                        destination,
                        body,
                    );
                    (storage, task)
                })
                .collect();
            Voting {
                registration,
                secondaries,
            }
        });
        if let Some(voting) = &voting {
            insert_transaction(
                &mut headers,
                voting.registration.id(),
                &primary.storage,
                true,
            )?;
        }
        let pending = PendingWrite {
            store: self.store().clone(),
            route,
            correlation_id,
            voting,
        };
        let channel = forward::channel(self, &primary);
        let (answer_tx, answer_rx) = oneshot::channel();
        tokio::spawn(async move {
            let sent = match channel {
                Ok(channel) => {
                    forward::send_on(channel, call.uri, headers, &primary, primary_body).await
                }
                Err(err) => Err(err),
            };
            let answer = match sent {
                Ok(response) => {
                    Ok(finalize::after_call(response, move |status| pending.finish(status)).await)
                }
                Err(err) => {
                    // Nothing reached the node's client side; what the votes say is recorded
                    // anyway, before the client hears of the failure.
                    let status = broken(err.to_string());
                    if let Err(recording) = finalize::detached(pending.finish(status)).await {
                        tracing::error!(error = %recording, "recording a failed write");
                    }
                    Err(err)
                }
            };
            // A client gone by now drops the answer, whose body then reads the node's answer
            // to its end and records it (see `finalize::Finalizing`).
            let _ = answer_tx.send(answer);
        });
        answer_rx.await.unwrap_or_else(|_| {
            Err(ProxyError::Request(
                "the write's task ended without an answer".into(),
            ))
        })
    }

    /// Registers the transaction of a write among its participants (the primary first).
    fn register(
        &self,
        participants: &[(Destination, Vec<u8>)],
    ) -> Result<Registration, ProxyError> {
        let Some(((primary, _), secondaries)) = participants.split_first() else {
            return Err(crate::routing::RoutingError::NoSuitableNode.into());
        };
        let secondaries: Vec<String> = secondaries.iter().map(|(d, _)| d.storage.clone()).collect();
        let (voters, threshold) = voters_for(&primary.storage, &secondaries);
        self.transactions
            .register(&primary.virtual_storage, voters, threshold)
            .map_err(|err| ProxyError::Request(Box::new(err)))
    }

    /// Runs a secondary's part of a transactional write in a task of its own.
    fn spawn_secondary(
        &self,
        registration: &Registration,
        uri: http::Uri,
        mut headers: http::HeaderMap,
        destination: Destination,
        body: tonic::body::Body,
    ) -> JoinHandle<CallStatus> {
        let canceller = registration.canceller();
        let prepared =
            insert_transaction(&mut headers, registration.id(), &destination.storage, false)
                .and_then(|()| forward::channel(self, &destination));
        tokio::spawn(async move {
            let status = match prepared {
                Ok(channel) => run_secondary(channel, uri, headers, &destination, body).await,
                Err(err) => broken(err.to_string()),
            };
            if !status.is_ok() {
                tracing::warn!(
                    storage = %destination.storage,
                    code = status.code,
                    message = %status.message,
                    "a secondary failed its part of a transactional write; it will be replicated"
                );
                canceller.cancel(&destination.storage);
            }
            status
        })
    }
}

/// Adds the `gitaly-reference-transaction` metadata for `storage`.
fn insert_transaction(
    headers: &mut http::HeaderMap,
    id: u64,
    storage: &str,
    primary: bool,
) -> Result<(), ProxyError> {
    let value = TransactionMetadata {
        id,
        node: storage.to_string(),
        primary,
    }
    .encode();
    let value =
        http::HeaderValue::from_str(&value).map_err(|e| ProxyError::Request(Box::new(e)))?;
    headers.insert(TRANSACTION_KEY, value);
    Ok(())
}

/// A secondary's call, its answer read and dropped: how it ended.
async fn run_secondary(
    channel: NodeChannel,
    uri: http::Uri,
    headers: http::HeaderMap,
    destination: &Destination,
    body: tonic::body::Body,
) -> CallStatus {
    let response = match forward::send_on(channel, uri, headers, destination, body).await {
        Ok(response) => response,
        Err(err) => return broken(format!("{err}: {}", err.chain())),
    };
    let (parts, mut body) = response.into_parts();
    if parts
        .headers
        .contains_key(crate::wire::header_names::GRPC_STATUS)
    {
        return call_status(&parts.headers);
    }
    finalize::ends_with(&mut body).await
}

/// The transaction of a write in flight and its secondaries' calls.
struct Voting {
    registration: Registration,
    secondaries: Vec<(String, JoinHandle<CallStatus>)>,
}

impl Voting {
    /// How each secondary's call ended; one still running after [`SECONDARY_GRACE`] is cut
    /// off and counts as failed.
    async fn statuses(self) -> (Registration, Vec<(String, CallStatus)>) {
        let deadline = tokio::time::Instant::now() + SECONDARY_GRACE;
        let mut statuses = Vec::with_capacity(self.secondaries.len());
        for (storage, mut task) in self.secondaries {
            let status = match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(status)) => status,
                Ok(Err(err)) => broken(err.to_string()),
                Err(_) => {
                    task.abort();
                    tracing::warn!(%storage, "a secondary did not finish in time after the primary");
                    broken("did not finish in time".to_string())
                }
            };
            statuses.push((storage, status));
        }
        (self.registration, statuses)
    }
}

/// What a write needs once the primary is done: the plan, and the transaction if it has one.
struct PendingWrite {
    store: Datastore,
    route: WriteRoute,
    correlation_id: String,
    voting: Option<Voting>,
}

impl PendingWrite {
    /// Records what the write did, given how the primary's call ended.
    async fn finish(self, primary_status: CallStatus) -> Result<(), Status> {
        let primary = self.route.primary().to_string();
        let decision = match self.voting {
            // Primary-only: a success changed the primary, the others catch up by replication.
            None if primary_status.is_ok() => Decision::Changed {
                updated_secondaries: Vec::new(),
                outdated: Vec::new(),
            },
            None => Decision::NothingChanged,
            Some(voting) => {
                // The primary is done: secondaries still waiting on its vote get their answer.
                voting.registration.cancel_voter(&primary);
                let (registration, statuses) = voting.statuses().await;
                let election = registration.finish();
                let decision = outcome::decide(
                    &election,
                    &primary,
                    &primary_status,
                    &statuses,
                    self.route.replication_targets(),
                );
                outcome::count_replications(&decision);
                decision
            }
        };
        let Decision::Changed {
            updated_secondaries,
            ..
        } = decision
        else {
            return Ok(());
        };
        let record = self.route.record(&updated_secondaries);
        finalize::record(&self.store, record, &self.correlation_id)
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "recording a write failed");
                ProxyError::Database(err).to_status()
            })
    }
}
