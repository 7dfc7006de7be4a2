//! Destination names: `/queue/NAME` and `/topic/NAME`.

use std::fmt;
use std::sync::Arc;

/// Longest destination name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 512;

/// A parsed destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// Point-to-point: each message goes to one consumer.
    Queue(Arc<str>),
    /// Publish-subscribe: each message goes to every subscription.
    Topic(Arc<str>),
}

impl Destination {
    /// Parses a STOMP destination header. The error says what was wrong.
    pub fn parse(text: &str) -> Result<Destination, String> {
        let (kind, name) = if let Some(name) = text.strip_prefix("/queue/") {
            ("queue", name)
        } else if let Some(name) = text.strip_prefix("/topic/") {
            ("topic", name)
        } else {
            return Err(format!(
                "destination '{text}' must start with /queue/ or /topic/"
            ));
        };
        if name.is_empty() {
            return Err(format!("destination '{text}' has an empty {kind} name"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(format!(
                "destination name is {} bytes, the limit is {MAX_NAME_LEN}",
                name.len()
            ));
        }
        if name.chars().any(|c| c.is_control()) {
            return Err(format!(
                "destination '{}' contains a control character",
                text.escape_debug()
            ));
        }
        Ok(match kind {
            "queue" => Destination::Queue(name.into()),
            _ => Destination::Topic(name.into()),
        })
    }

    /// The name without the `/queue/` or `/topic/` prefix.
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(n) | Destination::Topic(n) => n,
        }
    }

    /// True for queues.
    pub fn is_queue(&self) -> bool {
        matches!(self, Destination::Queue(_))
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Queue(n) => write!(f, "/queue/{n}"),
            Destination::Topic(n) => write!(f, "/topic/{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_queues_and_topics() {
        assert_eq!(
            Destination::parse("/queue/a.b").expect("queue"),
            Destination::Queue("a.b".into())
        );
        assert_eq!(
            Destination::parse("/topic/x").expect("topic").to_string(),
            "/topic/x"
        );
    }

    #[test]
    fn rejects_bad_names_with_reasons() {
        for (input, needle) in [
            ("queue/a", "must start with"),
            ("/queue/", "empty queue name"),
            ("/topic/a\nb", "control character"),
        ] {
            let err = Destination::parse(input).expect_err(input);
            assert!(err.contains(needle), "{input}: {err}");
        }
        let long = format!("/queue/{}", "x".repeat(MAX_NAME_LEN + 1));
        assert!(Destination::parse(&long)
            .expect_err("too long")
            .contains("limit"));
    }
}
