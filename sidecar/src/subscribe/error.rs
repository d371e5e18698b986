//! Why a subscription was refused before the upgrade, each reason one contract [`Kind`].

use axum::response::{IntoResponse, Response};
use eventwire_contract::problem::Kind;
use eventwire_contract::topic::TopicError;
use thiserror::Error;

use crate::auth::{AccessError, TicketError};
use crate::fanout::FanoutError;
use crate::problem::ProblemSource;
use crate::subscription::StartError;
use crate::subscription_filter::FilterError;

#[derive(Debug, Error)]
pub enum SubscribeError {
    #[error("the `topic` query parameter is required")]
    MissingTopic,
    #[error("invalid topic name: {0}")]
    InvalidTopic(#[from] TopicError),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("`{part}`: {reason}")]
    InvalidFrom { part: &'static str, reason: String },
    #[error("{0}")]
    InvalidFilter(#[from] FilterError),
    /// Missing, internal or not in `--push-topics`: the same answer, so nothing leaks.
    #[error("topic `{0}` does not exist or is not open to subscribers")]
    UnknownTopic(String),
    #[error("Kafka is not available: {0}")]
    BrokerUnavailable(String),
    #[error("{0}")]
    TooManySubscribers(String),
    #[error("{0}")]
    TooManyReplays(String),
    #[error(
        "subscribe with a WebSocket upgrade, or with `Accept: text/event-stream` for Server-Sent Events"
    )]
    TransportRequired,
    #[error("{0}")]
    Unauthorized(#[from] AccessError),
    #[error("topic `{0}` is not among the topics this token may read")]
    ForbiddenTopic(String),
    #[error("{0}")]
    Ticket(#[from] TicketError),
    #[error(
        "this {what} has {limit} subscriptions open, the most it may (--max-subscriptions-per-{flag})"
    )]
    Quota {
        limit: usize,
        what: &'static str,
        flag: &'static str,
    },
}

impl ProblemSource for SubscribeError {
    fn kind(&self) -> Kind {
        match self {
            SubscribeError::MissingTopic => Kind::MissingTopic,
            SubscribeError::InvalidTopic(_) => Kind::InvalidTopic,
            SubscribeError::InvalidQuery(_) => Kind::InvalidQuery,
            SubscribeError::InvalidFrom { .. } => Kind::InvalidFrom,
            SubscribeError::InvalidFilter(_) => Kind::InvalidFilter,
            SubscribeError::UnknownTopic(_) => Kind::UnknownTopic,
            SubscribeError::BrokerUnavailable(_) => Kind::BrokerUnavailable,
            SubscribeError::TooManySubscribers(_) => Kind::TooManySubscribers,
            SubscribeError::TooManyReplays(_) => Kind::TooManyReplays,
            SubscribeError::TransportRequired => Kind::TransportRequired,
            SubscribeError::Unauthorized(_) => Kind::Unauthorized,
            SubscribeError::ForbiddenTopic(_) => Kind::ForbiddenTopic,
            SubscribeError::Ticket(TicketError::TooMany) => Kind::TooManySubscribers,
            SubscribeError::Ticket(TicketError::Random(_)) => Kind::NotReady,
            SubscribeError::Quota { .. } => Kind::SubscriptionQuota,
        }
    }

    fn challenge(&self) -> &'static str {
        "Bearer realm=\"eventwire-subscribe\""
    }

    fn parameter(&self) -> Option<&str> {
        match self {
            SubscribeError::MissingTopic
            | SubscribeError::InvalidTopic(_)
            | SubscribeError::ForbiddenTopic(_) => Some("topic"),
            SubscribeError::Unauthorized(AccessError::Ticket) => Some("ticket"),
            SubscribeError::InvalidFrom { part, .. } => Some(part),
            SubscribeError::InvalidFilter(e) => Some(&e.path),
            _ => None,
        }
    }
}

impl IntoResponse for SubscribeError {
    fn into_response(self) -> Response {
        crate::problem::response(&self)
    }
}

impl From<StartError> for SubscribeError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Fanout(FanoutError::UnknownTopic(t)) => SubscribeError::UnknownTopic(t),
            StartError::Fanout(FanoutError::Unavailable(why)) => {
                SubscribeError::BrokerUnavailable(why)
            }
            StartError::Fanout(e @ FanoutError::TooManySubscribers(_)) => {
                SubscribeError::TooManySubscribers(e.to_string())
            }
            StartError::Fanout(e @ FanoutError::TooManyReplays(_)) => {
                SubscribeError::TooManyReplays(e.to_string())
            }
            other @ StartError::UnknownPartition { .. } => SubscribeError::InvalidFrom {
                part: "from",
                reason: other.to_string(),
            },
        }
    }
}
