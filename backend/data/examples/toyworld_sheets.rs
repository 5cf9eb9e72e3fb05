//! Writes the toy world's docs images: `cargo run -p data --example toyworld_sheets -- DIR`.

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "docs/img".into());
    data::toyworld::write_doc_images(std::path::Path::new(&dir), 7, 4, 64)?;
    Ok(())
}
