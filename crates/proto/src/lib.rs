//! Generated protobuf types and tonic service traits for the `chalk.*` packages Compute serves.
//!
//! The `.proto` files under `proto/` are rendered from the official SDK's descriptors by
//! `tools/gen_protos.py`; field names and numbers are the SDK's. Nothing but generated code lives here.

#![allow(clippy::all, missing_docs, rustdoc::all)]

/// The encoded `FileDescriptorSet` of every file under `proto/`, for reflection (Connect JSON, conformance).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.binpb"));

/// A descriptor pool over [`FILE_DESCRIPTOR_SET`], decoded once.
pub fn descriptor_pool() -> &'static prost_reflect::DescriptorPool {
    static POOL: std::sync::OnceLock<prost_reflect::DescriptorPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("descriptor set produced by build.rs decodes")
    })
}

macro_rules! package {
    ($name:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $name, ".rs"));
    };
}

pub mod chalk {
    pub mod arrow {
        pub mod v1 {
            package!("chalk.arrow.v1");
        }
    }
    pub mod artifactstore {
        pub mod v1 {
            package!("chalk.artifactstore.v1");
        }
    }
    pub mod auth {
        pub mod v1 {
            package!("chalk.auth.v1");
        }
    }
    pub mod common {
        pub mod v1 {
            package!("chalk.common.v1");
        }
    }
    pub mod container {
        pub mod v1 {
            package!("chalk.container.v1");
        }
    }
    pub mod externalfunctioncatalog {
        pub mod v1 {
            package!("chalk.externalfunctioncatalog.v1");
        }
    }
    pub mod runtime {
        pub mod v1 {
            package!("chalk.runtime.v1");
        }
    }
    pub mod sandbox {
        pub mod v1 {
            package!("chalk.sandbox.v1");
        }
        pub mod v2 {
            package!("chalk.sandbox.v2");
        }
    }
    pub mod scalinggroup {
        pub mod v1 {
            package!("chalk.scalinggroup.v1");
        }
    }
    pub mod server {
        pub mod v1 {
            package!("chalk.server.v1");
        }
    }
    pub mod volume {
        pub mod v1 {
            package!("chalk.volume.v1");
        }
        pub mod v2 {
            package!("chalk.volume.v2");
        }
    }
}
