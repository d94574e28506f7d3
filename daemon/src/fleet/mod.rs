//! The fleet: function versions as signed OCI artifacts from any registry.
//!
//! - [`reference`]: `oci://HOST[:PORT]/REPO:TAG` or `@sha256:DIGEST`, always naming its host.
//! - [`artifact`]: the CNCF wasm layout, judged on pull and written on push.
//! - [`registry`]: manifests and blobs over the distribution API (`oci-client`, rustls + ring),
//!   capped and hashed as they arrive.
//! - [`trust`]: cosign keyed signatures, checked against `[trust] keys`; [`signer`], the
//!   operator's key.
//! - [`blobs`]: the board's store, by digest, under the state dir; what each reference resolved
//!   to, so an offline board starts from it.
//! - [`images`]: a pull or a stored version, verified, ready for the runtime.
//! - [`push`]: `edgefn push` and `edgefn sign`.
//! - [`rollout`]: a new version switched in on trial, committed or rolled back by its gate;
//!   the board's record of what each function committed.
//!
//! Imports point one way: fleet → runtime, never back. The runtime sees a verified module as
//! a file path; it compiles it like any `.wasm` and never maps it as native code.

pub mod artifact;
pub mod blobs;
pub mod channel;
pub mod context;
pub mod events;
pub mod images;
pub mod listen;
pub mod operator;
pub mod poll;
pub mod push;
pub mod reference;
pub mod registry;
pub mod rollout;
pub mod signer;
pub mod trust;

pub use self::context::Context;
pub use self::images::{Images, Pulled};
pub use self::reference::ImageRef;
