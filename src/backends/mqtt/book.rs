//! The MQTT backend's resend book, as a state machine with no I/O: every QoS 1 and 2 publish
//! the gateway answers for, from the moment it enters rumqttc's request channel until the
//! broker acknowledged it. The event loop (`mod.rs`) feeds it rumqttc's events under one lock;
//! the book says what to publish again after a reconnect and settles each waiting request.
//!
//! rumqttc drops what it had not sent, or not seen acknowledged, when the broker answers a
//! reconnect without the session; the book keeps the order of rumqttc's channel, so it knows
//! which of its publishes those were and publishes them again, oldest first.

use std::collections::{HashMap, HashSet, VecDeque};

use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::sync::oneshot;

/// How a publish ended, for its waiting request.
pub(super) type Outcome = Result<(), Failure>;

/// Why a publish was not acknowledged.
#[derive(Debug, PartialEq)]
pub(super) enum Failure {
    /// The broker answered with a reason code.
    Refused(String),
    /// The broker lost the session and the publish could not be sent again within the
    /// broker's flow-control window; it may or may not have arrived before.
    Lost,
}

/// Connections a publish may see closed as the first one resent before it counts as refused.
pub(super) const MAX_STRIKES: u8 = 3;

/// One publish the gateway answers for, from enqueueing until the broker acknowledged it.
pub(super) struct Entry {
    seq: u64,
    pub(super) publish: Publish,
    /// Connections that closed while this publish was the first one resent (see `suspect`).
    strikes: u8,
    /// Gone when the request stopped waiting (timed out); the entry is still tracked so that
    /// the book stays in step with rumqttc.
    tx: Option<oneshot::Sender<Outcome>>,
}

impl Entry {
    /// A publish numbered `seq` in the order it entered rumqttc's channel, answered on `tx`.
    pub(super) fn new(seq: u64, publish: Publish, tx: oneshot::Sender<Outcome>) -> Self {
        Entry {
            seq,
            publish,
            strikes: 0,
            tx: Some(tx),
        }
    }

    /// Answers the waiting request (if it still waits).
    pub(super) fn settle(mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(outcome);
        }
    }
}

/// The publishes in rumqttc's hands: `queued` in the order rumqttc will send them, `inflight`
/// by packet id once sent, `limbo` = how many of the queued ones rumqttc moved to its pending
/// list when the connection failed.
#[derive(Default)]
pub(super) struct Book {
    queued: VecDeque<Entry>,
    inflight: HashMap<u16, Entry>,
    /// QoS 2 publishes past their PUBREC, waiting for PUBCOMP. Kept apart: rumqttc may give
    /// their packet id to a new publish before the PUBCOMP.
    released: HashMap<u16, Entry>,
    /// Packet ids rumqttc will send again after a reconnect that kept the session.
    resends: HashSet<u16>,
    limbo: usize,
    /// The publish (by `seq`) sent first after the latest CONNACK. A broker refuses some
    /// messages by closing the connection (an MQTT 3.1.1 broker has no reason codes: Mosquitto
    /// does this with a packet over its `max_packet_size`); such a message would be sent again
    /// on every reconnect and break every connection. When the connection fails before the
    /// suspect was acknowledged, it gets a strike; at `MAX_STRIKES` it is answered as refused
    /// and sent no more.
    suspect: Option<u64>,
}

/// The publish as rumqttc takes a new one: no packet id, not a duplicate.
fn fresh_copy(p: &Publish) -> Publish {
    let mut p = p.clone();
    p.pkid = 0;
    p.dup = false;
    p
}

impl Book {
    /// A publish that just entered rumqttc's channel (under the same lock, so the book's order
    /// is rumqttc's order).
    pub(super) fn push(&mut self, e: Entry) {
        self.queued.push_back(e);
    }

    /// A CONNACK: with the session kept, rumqttc resends what it holds; without it, the
    /// publishes rumqttc dropped are published again, oldest first, ahead of anything newer in
    /// its channel. rumqttc sends its pending list without flow control, so no more than the
    /// broker's receive window (`window`) goes again (more would collide on packet ids); the
    /// rest is answered `Lost`. Returns the publishes to put at the head of rumqttc's pending
    /// list, oldest first. `first_resend`: the packet id of the first publish in rumqttc's
    /// pending list.
    pub(super) fn on_connack(
        &mut self,
        session_present: bool,
        window: usize,
        first_resend: Option<u16>,
    ) -> Vec<Publish> {
        let mut again = Vec::new();
        if session_present {
            // rumqttc sends these again with their packet ids.
            self.resends = self.inflight.keys().copied().collect();
            self.suspect = first_resend
                .and_then(|id| self.inflight.get(&id))
                .map(|e| e.seq);
        } else {
            self.resends.clear();
            let mut lost: Vec<Entry> = self.inflight.drain().map(|(_, e)| e).collect();
            lost.extend(self.released.drain().map(|(_, e)| e));
            lost.sort_by_key(|e| e.seq);
            let limbo = self.limbo.min(self.queued.len());
            lost.extend(self.queued.drain(..limbo));
            if lost.len() > window {
                for e in lost.drain(window..) {
                    e.settle(Err(Failure::Lost));
                }
            }
            again = lost.iter().map(|e| fresh_copy(&e.publish)).collect();
            self.suspect = lost.first().map(|e| e.seq);
            for e in lost.into_iter().rev() {
                self.queued.push_front(e);
            }
        }
        self.limbo = 0;
        again
    }

    /// rumqttc wrote a publish: the head of the queue gets its packet id (or, at QoS 0, is
    /// done).
    pub(super) fn on_outgoing_publish(&mut self, pkid: u16) {
        if pkid != 0 && self.resends.remove(&pkid) {
            return; // a resend after a reconnect; already tracked
        }
        // Between a failure and the next CONNACK the only such events are stale ones:
        // publishes rumqttc had taken from its channel (and numbered) just before the failure.
        // They are not in `limbo`, which counts the unnumbered ones.
        if let Some(e) = self.queued.pop_front() {
            if pkid == 0 {
                e.settle(Ok(())); // QoS 0: written, nothing more will come
            } else {
                self.inflight.insert(pkid, e);
            }
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the publish leaves the book, to be settled by the
    /// caller outside its lock.
    pub(super) fn take_acked(&mut self, pkid: u16, qos2: bool) -> Option<Entry> {
        if qos2 {
            self.released.remove(&pkid)
        } else {
            self.inflight.remove(&pkid)
        }
    }

    /// PUBREC: the QoS 2 publish waits for its PUBCOMP, unless the broker refused it.
    pub(super) fn on_pubrec(&mut self, pkid: u16, outcome: Outcome) {
        if let Some(e) = self.inflight.remove(&pkid) {
            match outcome {
                Ok(()) => {
                    self.released.insert(pkid, e);
                }
                Err(f) => e.settle(Err(f)),
            }
        }
    }

    /// The connection failed with `limbo` publishes in rumqttc's pending list unnumbered
    /// (taken from its channel, never sent): they are the head of the queue. The suspect gets
    /// a strike; one at `MAX_STRIKES` leaves the book and is returned with its packet id, to
    /// be taken out of rumqttc's pending list and answered as refused.
    pub(super) fn on_failure(&mut self, limbo: usize) -> Option<(u16, Entry)> {
        self.limbo = limbo;
        let suspect = self.suspect.take();
        let struck = self
            .inflight
            .iter_mut()
            .find(|(_, e)| Some(e.seq) == suspect)
            .map(|(id, e)| {
                e.strikes += 1;
                (*id, e.strikes)
            });
        match struck {
            Some((id, strikes)) if strikes >= MAX_STRIKES => {
                self.inflight.remove(&id).map(|e| (id, e))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::QoS;

    use super::*;

    fn publish(book: &mut Book, seq: u64) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let p = Publish::new(format!("t/{seq}"), QoS::AtLeastOnce, vec![seq as u8], None);
        book.push(Entry::new(seq, p, tx));
        rx
    }

    fn settled(rx: &mut oneshot::Receiver<Outcome>) -> Option<Outcome> {
        rx.try_recv().ok()
    }

    #[test]
    fn acknowledged_publishes_settle_in_any_order() {
        let mut book = Book::default();
        let (mut a, mut b) = (publish(&mut book, 0), publish(&mut book, 1));
        book.on_outgoing_publish(1);
        book.on_outgoing_publish(2);
        book.take_acked(2, false).unwrap().settle(Ok(()));
        assert_eq!(settled(&mut b), Some(Ok(())));
        assert_eq!(settled(&mut a), None);
        book.take_acked(1, false).unwrap().settle(Ok(()));
        assert_eq!(settled(&mut a), Some(Ok(())));
        assert!(book.take_acked(1, false).is_none(), "settled once");
    }

    #[test]
    fn a_lost_session_publishes_again_oldest_first_within_the_window() {
        let mut book = Book::default();
        let mut rx: Vec<_> = (0..4).map(|s| publish(&mut book, s)).collect();
        // Two sent and numbered, one taken by rumqttc unnumbered (limbo), one still queued.
        book.on_outgoing_publish(7);
        book.on_outgoing_publish(8);
        assert!(book.on_failure(1).is_none());
        // A window of two: the oldest two go again, the third is answered as lost.
        let again = book.on_connack(false, 2, None);
        let topics: Vec<_> = again.iter().map(|p| p.topic.clone()).collect();
        assert_eq!(topics, ["t/0", "t/1"]);
        assert!(again.iter().all(|p| p.pkid == 0 && !p.dup));
        assert_eq!(settled(&mut rx[2]), Some(Err(Failure::Lost)));
        assert_eq!(settled(&mut rx[0]), None);
        // The resent ones are numbered anew as rumqttc writes them, in order.
        book.on_outgoing_publish(1);
        book.on_outgoing_publish(2);
        book.on_outgoing_publish(3);
        book.take_acked(1, false).unwrap().settle(Ok(()));
        book.take_acked(3, false).unwrap().settle(Ok(()));
        assert_eq!(settled(&mut rx[0]), Some(Ok(())));
        assert_eq!(settled(&mut rx[3]), Some(Ok(())));
    }

    #[test]
    fn a_kept_session_resends_with_the_same_ids_and_keeps_the_queue() {
        let mut book = Book::default();
        let mut a = publish(&mut book, 0);
        book.on_outgoing_publish(5);
        let mut b = publish(&mut book, 1);
        assert!(book.on_failure(0).is_none());
        assert!(book.on_connack(true, 10, Some(5)).is_empty());
        // rumqttc resends 5: not a new publish, so `b` is still first in the queue.
        book.on_outgoing_publish(5);
        book.on_outgoing_publish(6);
        book.take_acked(6, false).unwrap().settle(Ok(()));
        assert_eq!(settled(&mut b), Some(Ok(())));
        book.take_acked(5, false).unwrap().settle(Ok(()));
        assert_eq!(settled(&mut a), Some(Ok(())));
    }

    #[test]
    fn qos2_waits_for_pubcomp_and_qos0_is_done_when_written() {
        let mut book = Book::default();
        let mut two = publish(&mut book, 0);
        book.on_outgoing_publish(4);
        book.on_pubrec(4, Ok(()));
        assert!(
            book.take_acked(4, false).is_none(),
            "past PUBREC, only PUBCOMP settles it"
        );
        book.take_acked(4, true).unwrap().settle(Ok(()));
        assert_eq!(settled(&mut two), Some(Ok(())));
        let mut zero = publish(&mut book, 1);
        book.on_outgoing_publish(0);
        assert_eq!(settled(&mut zero), Some(Ok(())));
        let mut refused = publish(&mut book, 2);
        book.on_outgoing_publish(9);
        book.on_pubrec(9, Err(Failure::Refused("quota".into())));
        assert_eq!(
            settled(&mut refused),
            Some(Err(Failure::Refused("quota".into())))
        );
    }

    #[test]
    fn a_publish_that_breaks_every_connection_is_refused_at_the_third_strike() {
        let mut book = Book::default();
        let _rx = publish(&mut book, 0);
        book.on_outgoing_publish(3);
        assert!(
            book.on_failure(0).is_none(),
            "no reconnect yet to blame it on"
        );
        // The session is kept; 3 is resent first each time, and the connection breaks again.
        for _ in 1..MAX_STRIKES {
            assert!(book.on_connack(true, 10, Some(3)).is_empty());
            book.on_outgoing_publish(3);
            assert!(book.on_failure(0).is_none());
        }
        book.on_connack(true, 10, Some(3));
        let (id, e) = book.on_failure(0).expect("struck out");
        assert_eq!((id, e.publish.topic.as_ref()), (3, &b"t/0"[..]));
        assert!(book.take_acked(3, false).is_none(), "no longer tracked");
    }
}
