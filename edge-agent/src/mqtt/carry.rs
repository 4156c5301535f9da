//! The hub's QoS 1 publishes that a dropped MQTT session had not delivered, carried over to the
//! next one. The hub's sessions are clean (the broker keeps nothing for it), and rumqttc forgets
//! what was unacknowledged or still queued when it reconnects to a clean session: without this,
//! an exit alarm or a count report published as the broker restarted was lost. Bounded: past
//! [`CARRIED_MAX`] the oldest are dropped and counted. Pure: the link task moves requests in
//! and out.

use std::collections::VecDeque;

use rumqttc::{Publish, QoS, Request};

/// Most publishes carried over (a full request queue and a full in-flight window, with room to
/// spare); a session that keeps dropping before it delivers them loses the oldest.
pub const CARRIED_MAX: usize = 8_192;

#[derive(Debug, Default)]
pub struct Carried {
    queue: VecDeque<Publish>,
    /// Publishes dropped at the bound, since start.
    pub dropped: u64,
}

impl Carried {
    /// Takes the publishes out of what rumqttc set aside when the session dropped (its
    /// `pending`: the unacknowledged ones, then what was still queued, oldest first). Everything
    /// else there (acks, pings, subscriptions) belongs to the dead session and is left out: the
    /// next session subscribes again. Returns how many were dropped at the bound.
    pub fn take(&mut self, pending: &mut VecDeque<Request>) -> u64 {
        let before = self.dropped;
        for request in pending.drain(..) {
            let Request::Publish(mut publish) = request else { continue };
            if publish.qos == QoS::AtMostOnce {
                continue;
            }
            // A new session numbers its packets afresh; the old id could collide with one in use.
            publish.pkid = 0;
            publish.dup = false;
            if self.queue.len() == CARRIED_MAX {
                self.queue.pop_front();
                self.dropped += 1;
            }
            self.queue.push_back(publish);
        }
        self.dropped - before
    }

    /// The next publish to send again, when the session has room for it (rumqttc sends its
    /// `pending` list without looking at the in-flight window, so the link hands over one at a
    /// time, and only while the window has room).
    pub fn next(&mut self, room: bool) -> Option<Publish> {
        if room {
            self.queue.pop_front()
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{PingReq, PubAck, Subscribe};

    fn publish(topic: &str, qos: QoS, pkid: u16) -> Request {
        let mut p = Publish::new(topic, qos, vec![1u8]);
        p.pkid = pkid;
        p.dup = pkid != 0;
        Request::Publish(p)
    }

    #[test]
    fn keeps_the_publishes_in_order_with_fresh_packet_ids_and_nothing_else() {
        let mut pending: VecDeque<Request> = VecDeque::from([
            publish("alarm/1", QoS::AtLeastOnce, 7),
            Request::PubAck(PubAck::new(3)),
            publish("state", QoS::AtMostOnce, 0),
            Request::PingReq(PingReq),
            Request::Subscribe(Subscribe::new("dev/+/ack", QoS::AtLeastOnce)),
            publish("alarm/2", QoS::AtLeastOnce, 0),
        ]);
        let mut carried = Carried::default();
        assert_eq!(carried.take(&mut pending), 0);
        assert!(pending.is_empty(), "rumqttc's list is emptied: a clean session would drop it anyway");
        assert_eq!(carried.len(), 2);
        assert_eq!(carried.next(false), None, "nothing while the in-flight window is full");
        let first = carried.next(true).unwrap();
        assert_eq!((first.topic.as_str(), first.pkid, first.dup), ("alarm/1", 0, false));
        assert_eq!(carried.next(true).unwrap().topic, "alarm/2");
        assert!(carried.is_empty());
    }

    #[test]
    fn past_the_bound_the_oldest_are_dropped_and_counted() {
        let mut carried = Carried::default();
        let mut pending: VecDeque<Request> =
            (0..CARRIED_MAX + 3).map(|i| publish(&format!("t/{i}"), QoS::AtLeastOnce, 0)).collect();
        assert_eq!(carried.take(&mut pending), 3);
        assert_eq!((carried.len(), carried.dropped), (CARRIED_MAX, 3));
        assert_eq!(carried.next(true).unwrap().topic, "t/3", "the newest are kept");
    }
}
