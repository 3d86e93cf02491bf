//! Several stories for the same nodes in one NATS message (docs/cluster.md, "Bundles").
//!
//! A story crossing nodes costs each side per NATS message, not per byte: the client's parse of
//! the message and its headers, a channel hop to our task, and for QoS 1/2 a JetStream
//! acknowledgement to the publishing node and a consumer acknowledgement from the reading one.
//! The stories gathered over `cluster.linger_ms` that go to the same subject (the same nodes)
//! travel as one message: a bundle, stored in the stream as it travels, read back as its
//! stories, all at the bundle's stream sequence.
//!
//! Order: a topic's stories keep their order (MQTT-4.6.0-6: per topic and QoS, as the publisher
//! sent them). Two stories of one topic go to different subjects only when the interest table
//! changed between them; the second then never joins a bundle made before the first's.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::message::Message;
use crate::store::records::{self, RecordError};

/// The first byte of a bundle. A single story's record starts with its format byte (1), so a
/// story alone travels as before and a node reads both.
const BUNDLE: u8 = 0xB0;
/// A bundle grows to at most this many bytes; a larger story travels alone (NATS refuses
/// messages above its `max_payload`, 1 MiB by default).
pub const MAX_BUNDLE: usize = 64 * 1024;

/// One story to send: its subject, the hash of its topic (None: never bundled, and nothing
/// after it joins a bundle made before it), its record, and what the sender keeps of it.
pub struct Outgoing<T> {
    pub subject: String,
    pub topic: Option<u64>,
    pub payload: Bytes,
    pub tag: T,
}

/// The hash a story's topic is bundled by (FNV-1a: topics are short). Two topics with one hash
/// only bundle less.
pub fn topic_hash(topic: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// What goes to NATS as one message: the subject and the stories' records with their tags.
pub struct Group<T> {
    pub subject: String,
    pub stories: Vec<(Bytes, T)>,
    size: usize,
}

impl<T> Group<T> {
    /// The message's payload: the story's record alone, or a bundle of them.
    pub fn payload(&self) -> Bytes {
        if let [(one, _)] = &self.stories[..] {
            return one.clone();
        }
        let mut out = BytesMut::with_capacity(self.size + 1);
        out.put_u8(BUNDLE);
        for (record, _) in &self.stories {
            out.put_u32(record.len() as u32);
            out.put_slice(record);
        }
        out.freeze()
    }
}

/// Groups `items`, in the order given, into as few messages as order allows: a story joins
/// the last group of its subject unless a story of its topic went to a later group, a story
/// without a topic came after that group, or the group would pass `MAX_BUNDLE`. Groups are in
/// the order of their first story.
pub fn group<T>(items: impl IntoIterator<Item = Outgoing<T>>) -> Vec<Group<T>> {
    let mut groups: Vec<Group<T>> = Vec::new();
    // The last group of each subject, and the group of each topic's last story.
    let mut of_subject: HashMap<String, usize> = HashMap::new();
    let mut of_topic: HashMap<u64, usize> = HashMap::new();
    // No story joins a group before this one (a story without a topic is a barrier).
    let mut floor = 0;
    for Outgoing { subject, topic, payload, tag } in items {
        let size = 4 + payload.len();
        let joins = topic.and_then(|t| {
            let g = *of_subject.get(&subject)?;
            let after_topic = of_topic.get(&t).is_none_or(|&tg| tg <= g);
            (g >= floor && after_topic && groups[g].size + size <= MAX_BUNDLE).then_some(g)
        });
        let g = match joins {
            Some(g) => g,
            None => {
                groups.push(Group { subject: subject.clone(), stories: Vec::new(), size: 0 });
                let g = groups.len() - 1;
                match topic {
                    Some(_) => {
                        of_subject.insert(subject, g);
                    }
                    None => floor = g + 1,
                }
                g
            }
        };
        if let Some(t) = topic {
            of_topic.insert(t, g);
        }
        groups[g].size += size;
        groups[g].stories.push((payload, tag));
    }
    groups
}

/// The stories of a message another node sent: one, or a bundle's, in order. A bundle cut
/// short gives an error for its rest.
pub fn stories(payload: &[u8]) -> Stories<'_> {
    match payload.split_first() {
        Some((&BUNDLE, rest)) => Stories { rest, bundled: true },
        _ => Stories { rest: payload, bundled: false },
    }
}

pub struct Stories<'a> {
    rest: &'a [u8],
    bundled: bool,
}

impl Iterator for Stories<'_> {
    type Item = Result<Message, RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.bundled {
            // A story alone: its record, once.
            let one = std::mem::take(&mut self.rest);
            self.bundled = true;
            return Some(records::decode_message(one));
        }
        if self.rest.is_empty() {
            return None;
        }
        let Some((len, rest)) = self.rest.split_first_chunk::<4>() else {
            self.rest = &[];
            return Some(records::decode_message(&[]));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            self.rest = &[];
            return Some(records::decode_message(&[]));
        }
        let (record, rest) = rest.split_at(len);
        self.rest = rest;
        Some(records::decode_message(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;

    fn story(topic: &str, n: u8) -> Bytes {
        Bytes::from(records::encode_message(&Message::new(topic.into(), Bytes::from(vec![n]), QoS::AtLeastOnce, false)))
    }

    fn out(subject: &str, topic: Option<&str>, n: u8) -> Outgoing<u8> {
        let payload = story(topic.unwrap_or("ledger"), n);
        Outgoing { subject: subject.into(), topic: topic.map(topic_hash), payload, tag: n }
    }

    fn tags(groups: &[Group<u8>]) -> Vec<(String, Vec<u8>)> {
        groups.iter().map(|g| (g.subject.clone(), g.stories.iter().map(|s| s.1).collect())).collect()
    }

    #[test]
    fn stories_for_the_same_nodes_share_a_message_and_read_back_in_order() {
        let groups = group([out("a", Some("t/1"), 1), out("b", Some("t/2"), 2), out("a", Some("t/3"), 3)]);
        assert_eq!(tags(&groups), [("a".to_owned(), vec![1, 3]), ("b".to_owned(), vec![2])]);
        let read: Vec<_> = stories(&groups[0].payload()).map(|m| m.unwrap().payload[0]).collect();
        assert_eq!(read, [1, 3]);
        // A story alone travels as its record, as before bundles.
        assert_eq!(groups[1].payload(), story("t/2", 2));
        assert_eq!(stories(&groups[1].payload()).map(|m| m.unwrap().payload[0]).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_topic_keeps_its_order_when_its_nodes_change() {
        // MQTT-4.6.0-6: t/1's stories 1 and 3 went to "a", then its interest changed and 4 went to
        // "b"; 5 (t/1, "a" again) must come after 4, so it cannot join the first group.
        let groups = group([
            out("a", Some("t/1"), 1),
            out("b", Some("t/2"), 2),
            out("a", Some("t/1"), 3),
            out("b", Some("t/1"), 4),
            out("a", Some("t/1"), 5),
            out("a", Some("t/9"), 6),
        ]);
        assert_eq!(
            tags(&groups),
            [("a".to_owned(), vec![1, 3]), ("b".to_owned(), vec![2, 4]), ("a".to_owned(), vec![5, 6])]
        );
    }

    #[test]
    fn a_story_without_a_topic_is_alone_and_a_barrier() {
        let groups = group([out("a", Some("t/1"), 1), out("q", None, 2), out("q", None, 3), out("a", Some("t/2"), 4)]);
        assert_eq!(
            tags(&groups),
            [
                ("a".to_owned(), vec![1]),
                ("q".to_owned(), vec![2]),
                ("q".to_owned(), vec![3]),
                ("a".to_owned(), vec![4])
            ]
        );
    }

    #[test]
    fn a_bundle_stops_at_its_size() {
        let big = Bytes::from(vec![0; MAX_BUNDLE / 2]);
        let item = |n| Outgoing { subject: "a".into(), topic: Some(topic_hash("t")), payload: big.clone(), tag: n };
        let groups = group([item(1), item(2), item(3)]);
        assert_eq!(tags(&groups), [("a".to_owned(), vec![1]), ("a".to_owned(), vec![2]), ("a".to_owned(), vec![3])]);
        assert!(groups.iter().all(|g| g.payload().len() <= MAX_BUNDLE));
    }

    #[test]
    fn a_bundle_cut_short_reads_as_an_error_not_a_panic() {
        let groups = group([out("a", Some("t/1"), 1), out("a", Some("t/1"), 2)]);
        let whole = groups[0].payload();
        for cut in 0..whole.len() {
            let read: Vec<_> = stories(&whole[..cut]).collect();
            assert!(read.len() <= 2);
        }
        let read: Vec<_> = stories(&whole[..whole.len() - 1]).collect();
        assert!(read[0].is_ok() && read[1].is_err());
    }
}
