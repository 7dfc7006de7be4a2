//! The consumer's memory of what it acknowledged, to drop redeliveries.
//!
//! After a failover the broker redelivers every message whose ACK it had
//! not stored, including ones the application did acknowledge (the ACK was
//! lost with the connection, or was made afterwards on the dead one). A
//! resent SEND may also have been stored twice by a broker without the
//! once-only check. [`Window`] remembers, for one consumer, the last
//! `capacity` acknowledged messages by identity (the `message-id`, with the
//! broker's `timestamp` and a CRC of destination and body) and, for
//! messages that carry them, by (`fmq-producer-id`, `fmq-sequence`); a delivery that matches
//! either is a duplicate. Memory is bounded: the oldest entries are
//! forgotten first.

use std::collections::{HashSet, VecDeque};

/// A producer id and sequence number, as carried by producer-tagged
/// messages.
pub(crate) type ProducerKey = (String, u64);

#[derive(Debug)]
struct Entry {
    message_id: String,
    producer: Option<ProducerKey>,
}

/// A bounded set of acknowledged messages, oldest forgotten first.
#[derive(Debug)]
pub(crate) struct Window {
    capacity: usize,
    ids: HashSet<String>,
    producers: HashSet<ProducerKey>,
    order: VecDeque<Entry>,
}

impl Window {
    /// A window remembering `capacity` acknowledged messages (0 remembers
    /// none: nothing is ever a duplicate).
    pub(crate) fn new(capacity: usize) -> Window {
        Window {
            capacity,
            ids: HashSet::new(),
            producers: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether a delivery with this `message-id` and producer key was
    /// acknowledged before.
    pub(crate) fn contains(&self, message_id: &str, producer: Option<&ProducerKey>) -> bool {
        (!message_id.is_empty() && self.ids.contains(message_id))
            || producer.is_some_and(|p| self.producers.contains(p))
    }

    /// Remembers an acknowledged message, forgetting the oldest one when
    /// full. Remembering a message twice keeps one entry.
    pub(crate) fn insert(&mut self, message_id: &str, producer: Option<ProducerKey>) {
        if self.capacity == 0 || self.contains(message_id, producer.as_ref()) {
            return;
        }
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old.message_id);
                if let Some(p) = &old.producer {
                    self.producers.remove(p);
                }
            }
        }
        if !message_id.is_empty() {
            self.ids.insert(message_id.to_owned());
        }
        if let Some(p) = &producer {
            self.producers.insert(p.clone());
        }
        self.order.push_back(Entry {
            message_id: message_id.to_owned(),
            producer,
        });
    }

    /// How many acknowledged messages are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str, s: u64) -> Option<ProducerKey> {
        Some((p.to_owned(), s))
    }

    #[test]
    fn remembers_by_message_id_and_by_producer_sequence() {
        let mut w = Window::new(10);
        assert!(!w.contains("m1", None));
        w.insert("m1", None);
        w.insert("m2", key("p", 7));
        assert!(w.contains("m1", None));
        assert!(w.contains("m1", key("q", 1).as_ref()));
        // Same message stored twice by the broker: another id, same key.
        assert!(w.contains("m9", key("p", 7).as_ref()));
        assert!(!w.contains("m9", key("p", 8).as_ref()));
        assert!(!w.contains("m9", key("other", 7).as_ref()));
        assert!(!w.contains("", None), "an empty id never matches");
    }

    #[test]
    fn forgets_the_oldest_when_full() {
        let mut w = Window::new(3);
        for i in 1..=5 {
            w.insert(&format!("m{i}"), key("p", i));
        }
        assert_eq!(w.len(), 3);
        for i in 1..=2 {
            assert!(!w.contains(&format!("m{i}"), None));
            assert!(!w.contains("x", key("p", i).as_ref()));
        }
        for i in 3..=5 {
            assert!(w.contains(&format!("m{i}"), None));
            assert!(w.contains("x", key("p", i).as_ref()));
        }
    }

    #[test]
    fn inserting_twice_keeps_one_entry() {
        let mut w = Window::new(2);
        w.insert("m1", key("p", 1));
        w.insert("m1", key("p", 1));
        w.insert("m1-copy", key("p", 1));
        assert_eq!(w.len(), 1);
        w.insert("m2", None);
        assert!(w.contains("m1", None));
        assert!(w.contains("m2", None));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut w = Window::new(0);
        w.insert("m1", key("p", 1));
        assert!(!w.contains("m1", key("p", 1).as_ref()));
        assert_eq!(w.len(), 0);
    }
}
