//! Calls on a pool: the non-blocking engine of one call ([`engine`](self) internals), where
//! inputs come from (feeds), where they go (dispatch), waiting between steps, and the two
//! front ends: [`Map`] (a blocking iterator over inputs that are ready) and streams
//! ([`StreamSender`] / [`StreamReceiver`], for live sources), with async adapters over
//! streams behind the `async` feature.

#[cfg(feature = "async")]
pub mod async_stream;
mod collect;
pub(crate) mod dispatch;
pub(crate) mod engine;
pub(crate) mod feed;
pub mod map;
pub(crate) mod source;
pub mod stream;
pub(crate) mod wait;

#[cfg(feature = "async")]
pub use async_stream::{AsyncReceiver, AsyncSender};
pub use map::Map;
pub use stream::{StreamReceiver, StreamSender};
