//! SUBACK tracking for the MQTT backend, beside the publish book in the backend's event loop:
//! which SUBSCRIBE each SUBACK answers, so that a live subscription or a last-value read learns
//! whether the broker granted or refused its filter (an ACL) before its client is told anything.
//!
//! SUBSCRIBEs enter rumqttc's request channel in the order they enter `queued` (both under one
//! lock); rumqttc numbers and writes them in that order and reports `Outgoing::Subscribe(pkid)`,
//! so the head of `queued` gets that packet id, and the SUBACK with that id settles it. When
//! the connection fails, rumqttc moves the SUBSCRIBEs still in its channel to its pending list
//! (`limbo` of them), and drops them if the broker comes back without the session; a SUBSCRIBE
//! written but never answered is lost either way. On the CONNACK every lost or dropped filter
//! is asked again, so a waiting client always hears the broker's answer.

use std::collections::{HashMap, VecDeque};

use tokio::sync::watch;

/// What the broker said to a filter's SUBSCRIBE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    Pending,
    Granted,
    /// The SUBACK's reason code.
    Refused(String),
    /// The SUBSCRIBE could not be handed to the client (its request queue stayed full).
    NotAsked,
}

/// A SUBSCRIBE in rumqttc's hands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// The MQTT 5 response topic of request/response routes.
    ResponseTopic,
    Filter(String),
}

#[derive(Default)]
pub struct Asks {
    /// Handed to rumqttc, not yet written, in rumqttc's order.
    queued: VecDeque<Ask>,
    /// Written, waiting for their SUBACK, by packet id. rumqttc numbers SUBSCRIBEs in the
    /// range of its in-flight window without holding them back, so under a burst one id can
    /// be in flight twice; the broker answers in order, so the oldest takes the SUBACK.
    sent: HashMap<u16, VecDeque<Ask>>,
    /// How many of `queued` rumqttc held in its pending list when the connection failed.
    limbo: usize,
    /// Filters whose SUBSCRIBE is under way, with the clients waiting on it.
    grants: HashMap<String, watch::Sender<Grant>>,
    /// Filters whose SUBSCRIBE was written and unanswered when the connection failed, with how
    /// many connections in a row failed so: a broker that closes the connection over a
    /// SUBSCRIBE must not be asked for it for ever (a reconnect storm every client pays for).
    strikes: HashMap<String, u8>,
}

impl Asks {
    /// Records a SUBSCRIBE for `filter` just handed to rumqttc; returns its grant.
    pub fn asked(&mut self, filter: &str) -> watch::Receiver<Grant> {
        self.queued.push_back(Ask::Filter(filter.to_string()));
        self.grant(filter)
    }

    /// The grant of `filter`'s SUBSCRIBE under way, or a new pending one.
    pub fn grant(&mut self, filter: &str) -> watch::Receiver<Grant> {
        self.grants
            .entry(filter.to_string())
            .or_insert_with(|| watch::channel(Grant::Pending).0)
            .subscribe()
    }

    /// The grant of `filter`'s SUBSCRIBE, when one is under way.
    pub fn pending(&self, filter: &str) -> Option<watch::Receiver<Grant>> {
        self.grants.get(filter).map(watch::Sender::subscribe)
    }

    /// Tells the clients waiting on `filter` how its SUBSCRIBE ended.
    pub fn settle(&mut self, filter: &str, grant: Grant) {
        if let Some(tx) = self.grants.remove(filter) {
            tx.send_replace(grant);
        }
    }

    /// rumqttc wrote a SUBSCRIBE: the head of the queue gets its packet id.
    pub fn written(&mut self, pkid: u16) {
        if let Some(ask) = self.queued.pop_front() {
            self.sent.entry(pkid).or_default().push_back(ask);
        }
    }

    /// The SUBACK for `pkid` (its first reason code): which SUBSCRIBE it answers. A filter's
    /// waiting clients are told.
    pub fn answered(&mut self, pkid: u16, outcome: Result<(), String>) -> Option<Ask> {
        let same_id = self.sent.get_mut(&pkid)?;
        let ask = same_id.pop_front()?;
        if same_id.is_empty() {
            self.sent.remove(&pkid);
        }
        if let Ask::Filter(f) = &ask {
            self.strikes.remove(f);
            let grant = match outcome {
                Ok(()) => Grant::Granted,
                Err(reason) => Grant::Refused(reason),
            };
            self.settle(f, grant);
        }
        Some(ask)
    }

    /// The connection failed with `limbo` SUBSCRIBEs in rumqttc's pending list. Every filter
    /// written and unanswered takes a strike; those at `max` strikes are refused (their waiting
    /// clients told why) and returned, so the caller drops them from what is asked again.
    pub fn failed(&mut self, limbo: usize, max: u8) -> Vec<String> {
        self.limbo = limbo.min(self.queued.len());
        let mut out = Vec::new();
        for ask in self.sent.values().flatten() {
            if let Ask::Filter(f) = ask {
                let n = self.strikes.entry(f.clone()).or_default();
                *n += 1;
                if *n >= max && !out.contains(f) {
                    out.push(f.clone());
                }
            }
        }
        for f in &out {
            self.strikes.remove(f);
            self.settle(
                f,
                Grant::Refused(format!(
                    "the broker closed the connection each of the {max} times it was asked for this filter"
                )),
            );
        }
        out
    }

    /// A CONNACK. `again` are the filters the event loop places again itself (at the back of
    /// rumqttc's pending list, behind what it kept); to them are added the filters whose
    /// SUBSCRIBE was written and never answered, and, when the broker lost the session, those
    /// rumqttc dropped from its pending list — as long as someone still wants them (`wanted`:
    /// a live subscription or a read holds the filter, or a client waits on its grant; the
    /// others are settled, so that no broker subscription outlives its last client). Returns
    /// every filter to place again, in order. `response_topic`: the loop puts the response
    /// topic's SUBSCRIBE first of all.
    pub fn reconnected(
        &mut self,
        session_present: bool,
        response_topic: bool,
        again: Vec<String>,
        wanted: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let limbo = std::mem::take(&mut self.limbo).min(self.queued.len());
        let mut lost: Vec<Ask> = self.sent.drain().flat_map(|(_, a)| a).collect();
        let kept = if session_present {
            limbo
        } else {
            lost.extend(self.queued.drain(..limbo));
            0
        };
        let mut all = again;
        for ask in lost {
            let Ask::Filter(f) = ask else { continue };
            if all.contains(&f) {
                continue;
            }
            let waited = self.grants.get(&f).is_some_and(|g| g.receiver_count() > 0);
            if waited || wanted(&f) {
                all.push(f);
            } else {
                self.settle(&f, Grant::NotAsked);
            }
        }
        let rest = self.queued.split_off(kept);
        let mut queued = VecDeque::with_capacity(1 + kept + all.len() + rest.len());
        if response_topic {
            queued.push_back(Ask::ResponseTopic);
        }
        queued.extend(self.queued.drain(..));
        queued.extend(all.iter().cloned().map(Ask::Filter));
        queued.extend(rest);
        self.queued = queued;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Ask {
        Ask::Filter(s.into())
    }

    #[test]
    fn suback_settles_the_filter_written_with_its_packet_id() {
        let mut a = Asks::default();
        let ga = a.asked("a/#");
        let gb = a.asked("b/#");
        a.written(7);
        a.written(8);
        assert_eq!(a.answered(8, Err("NotAuthorized".into())), Some(f("b/#")));
        assert_eq!(*gb.borrow(), Grant::Refused("NotAuthorized".into()));
        assert_eq!(*ga.borrow(), Grant::Pending);
        assert_eq!(a.answered(7, Ok(())), Some(f("a/#")));
        assert_eq!(*ga.borrow(), Grant::Granted);
        assert_eq!(a.answered(7, Ok(())), None);
    }

    #[test]
    fn a_filter_the_broker_drops_the_connection_over_is_refused_after_max_strikes() {
        let mut a = Asks::default();
        let g = a.asked("poison");
        for round in 1..=3 {
            a.written(1);
            let struck = a.failed(0, 3);
            assert_eq!(struck.is_empty(), round < 3, "round {round}");
            // The backend drops a struck filter from its live subscriptions: not wanted.
            let again = a.reconnected(true, false, vec![], |f| !struck.iter().any(|s| s == f));
            assert_eq!(again.is_empty(), round == 3, "round {round}");
        }
        assert!(matches!(&*g.borrow(), Grant::Refused(r) if r.contains("closed the connection")));
        // An answer in between clears the strikes.
        let _ = a.asked("fine");
        a.written(2);
        a.failed(0, 3);
        a.reconnected(true, false, vec![], |_| true);
        a.written(3);
        assert_eq!(a.answered(3, Ok(())), Some(f("fine")));
        assert!(a.strikes.is_empty());
    }

    #[test]
    fn a_packet_id_in_flight_twice_is_answered_in_order() {
        let mut a = Asks::default();
        let first = a.asked("first");
        let second = a.asked("second");
        a.written(3);
        a.written(3);
        assert_eq!(a.answered(3, Ok(())), Some(f("first")));
        assert_eq!(
            a.answered(3, Err("NotAuthorized".into())),
            Some(f("second"))
        );
        assert_eq!(*first.borrow(), Grant::Granted);
        assert_eq!(*second.borrow(), Grant::Refused("NotAuthorized".into()));
    }

    #[test]
    fn a_reconnect_asks_again_for_what_was_lost_and_keeps_the_order() {
        let mut a = Asks::default();
        a.asked("sent");
        a.asked("limbo");
        a.asked("later");
        a.written(1);
        // "limbo" sat in rumqttc's pending list; "later" came to its channel after the failure.
        a.failed(1, 3);
        let again = a.reconnected(true, true, vec!["live".into()], |_| true);
        assert_eq!(again, vec!["live".to_string(), "sent".to_string()]);
        for (i, want) in [
            Ask::ResponseTopic,
            f("limbo"),
            f("live"),
            f("sent"),
            f("later"),
        ]
        .into_iter()
        .enumerate()
        {
            a.written(10 + i as u16);
            assert_eq!(a.answered(10 + i as u16, Ok(())), Some(want));
        }
    }

    #[test]
    fn without_the_session_the_dropped_subscribes_are_asked_again() {
        let mut a = Asks::default();
        a.asked("limbo");
        a.asked("later");
        a.failed(1, 3);
        let again = a.reconnected(false, false, vec![], |_| true);
        assert_eq!(again, vec!["limbo".to_string()]);
        a.written(1);
        a.written(2);
        assert_eq!(a.answered(1, Ok(())), Some(f("limbo")));
        assert_eq!(a.answered(2, Ok(())), Some(f("later")));
    }

    #[test]
    fn a_lost_subscribe_nobody_wants_is_not_asked_again() {
        let mut a = Asks::default();
        drop(a.asked("left"));
        let kept = a.asked("waited");
        a.written(1);
        a.written(2);
        let again = a.reconnected(true, false, vec![], |_| false);
        assert_eq!(again, vec!["waited".to_string()]);
        assert_eq!(*kept.borrow(), Grant::Pending);
        assert!(a.pending("left").is_none());
    }
}
