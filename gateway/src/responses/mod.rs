//! OpenAI's Responses API (`/v1/responses`) for deployments that serve only chat: requests become
//! chat requests (`request`), chat answers and chunks become `response` objects and Responses
//! stream events (`response`, `stream`). The same files read what an upstream serving the
//! Responses API natively answers, as chat, which is how Loom observes every call.

pub mod request;
pub mod response;
pub mod stream;

#[cfg(test)]
mod tests;
