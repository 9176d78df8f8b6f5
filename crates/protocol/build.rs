//! Generates the protobuf messages and ttrpc bindings for `protos/agent.proto` into `OUT_DIR`.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=protos/agent.proto");

    Codegen::new()
        .out_dir(&out_dir)
        .input("protos/agent.proto")
        .include("protos")
        .rust_protobuf()
        .customize(Customize::default())
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating agent.proto bindings failed");

    std::fs::write(
        out_dir.join("generated.rs"),
        "pub mod agent;\npub mod agent_ttrpc;\n",
    )
    .expect("writing generated.rs failed");
}
