//! The generated gRPC code of `proto/rrt/v1`: messages, clients and servers of the public
//! `Generation` service, the internal `Worker` service and the `Coordinator` service, and the
//! descriptor set that server reflection serves; [`exits`] holds the arithmetic of the exit
//! statistics workers report, and [`stream`] the typed view of a streamed token message.

#![forbid(unsafe_code)]

pub mod exits;
pub mod stream;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("rrt.v1");
}

/// The encoded `FileDescriptorSet` of `rrt.v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rrt_v1_descriptor.bin"));
