//! Checks that the front-end assets from the npm registry are installed before they are
//! embedded into the binary, and says how to get them when they are not.

use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let htmx = root.join("node_modules/htmx.org/dist/htmx.min.js");
    println!("cargo:rerun-if-changed={}", htmx.display());
    println!("cargo:rerun-if-changed=../../frontend/templates");
    println!("cargo:rerun-if-changed=../../static");
    println!("cargo:rerun-if-changed=../../migrations");
    if !htmx.exists() {
        panic!(
            "\n\nstorygpt-v embeds htmx from the npm registry, and {} is missing.\n\
             Run `npm ci` in the repository root first (see README.md).\n\n",
            htmx.display()
        );
    }
}
