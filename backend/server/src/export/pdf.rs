//! A small PDF 1.4 writer for the comic-page export: A4 portrait pages, the title on the
//! first, panels in a two-column, three-row grid with the caption centred under each panel.
//!
//! Only what the page needs: the standard Helvetica fonts (no embedding; every viewer has
//! them) with WinAnsiEncoding, JPEG images as `/DCTDecode` image XObjects (the JPEG bytes
//! are the stream, no re-encoding by the viewer), uncompressed content streams, and a
//! classic cross-reference table whose byte offsets are recorded as objects are written.
//! Text is converted to WinAnsi bytes: `(`, `)` and `\` are escaped, bytes outside printable
//! ASCII are written as octal escapes, and characters WinAnsi lacks become `?`.

/// A JPEG ready to embed.
#[derive(Debug, Clone)]
pub struct Jpeg {
    /// Baseline JPEG bytes (3 components, RGB).
    pub bytes: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// One panel of the comic.
#[derive(Debug, Clone)]
pub struct Panel {
    /// 1-based frame number.
    pub number: usize,
    /// The caption printed under the panel.
    pub caption: String,
    /// The frame image, or `None` for an empty panel.
    pub image: Option<Jpeg>,
    /// What an empty panel says (after "Frame N: ").
    pub placeholder: String,
}

/// A4 portrait in PostScript points.
pub const PAGE_WIDTH: f64 = 595.28;
/// A4 portrait height in points.
pub const PAGE_HEIGHT: f64 = 841.89;
/// Panels per page: two columns, three rows.
pub const PANELS_PER_PAGE: usize = 6;

const MARGIN: f64 = 42.0;
const COLUMN_GAP: f64 = 18.0;
const ROW_GAP: f64 = 14.0;
const CAPTION_HEIGHT: f64 = 50.0;
const CAPTION_GAP: f64 = 5.0;
const FOOTER_HEIGHT: f64 = 16.0;

/// Helvetica advance widths (1/1000 em) of WinAnsi codes 32..=126, from Adobe's AFM.
const HELVETICA_WIDTHS: [u16; 95] = [
    278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, // 32-47
    556, 556, 556, 556, 556, 556, 556, 556, 556, 556, // 48-57
    278, 278, 584, 584, 584, 556, 1015, // 58-64
    667, 667, 722, 722, 667, 611, 778, 722, 278, 500, 667, 556, 833, 722, 778, 667, 778, 722, 667,
    611, 722, 667, 944, 667, 667, 611, // 65-90
    278, 278, 278, 469, 556, 333, // 91-96
    556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, 556, 556, 333, 500,
    278, 556, 500, 722, 500, 500, 500, // 97-122
    334, 260, 334, 584, // 123-126
];

/// Width of one WinAnsi byte in 1/1000 em. Codes above 126 are estimated by class (accented
/// capitals are wide, punctuation narrow); wrapping only needs to be close. Bold text is
/// measured as 8% wider than regular, which errs on the safe (narrower line) side.
fn byte_width(b: u8, bold: bool) -> f64 {
    let w = match b {
        32..=126 => HELVETICA_WIDTHS[(b - 32) as usize] as f64,
        0x85 | 0x89 | 0x97 | 0x99 => 1000.0,
        0x91..=0x94 => 333.0,
        0xC0..=0xDE => 722.0,
        0xA0..=0xBF => 400.0,
        _ => 556.0,
    };
    if bold {
        w * 1.08
    } else {
        w
    }
}

/// Text as WinAnsiEncoding bytes: Latin-1 maps to itself, the typographic marks WinAnsi has
/// in 0x80..0x9F (curly quotes, dashes, ellipsis, euro, ...) to their codes, white space to a
/// space, and everything else (other scripts, emoji, control characters) to `?`.
pub fn winansi(text: &str) -> Vec<u8> {
    text.chars()
        .map(|ch| match ch {
            '\n' | '\r' | '\t' => b' ',
            ' '..='~' => ch as u8,
            '\u{a0}'..='\u{ff}' => ch as u32 as u8,
            '€' => 0x80,
            '‚' => 0x82,
            'ƒ' => 0x83,
            '„' => 0x84,
            '…' => 0x85,
            '†' => 0x86,
            '‡' => 0x87,
            'ˆ' => 0x88,
            '‰' => 0x89,
            'Š' => 0x8A,
            '‹' => 0x8B,
            'Œ' => 0x8C,
            'Ž' => 0x8E,
            '‘' => 0x91,
            '’' => 0x92,
            '“' => 0x93,
            '”' => 0x94,
            '•' => 0x95,
            '–' => 0x96,
            '—' => 0x97,
            '˜' => 0x98,
            '™' => 0x99,
            'š' => 0x9A,
            '›' => 0x9B,
            'œ' => 0x9C,
            'ž' => 0x9E,
            'Ÿ' => 0x9F,
            _ => b'?',
        })
        .collect()
}

/// A PDF literal string of WinAnsi bytes: `(`, `)`, `\` escaped, non-ASCII as octal.
pub fn literal(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('(');
    for &b in bytes {
        match b {
            b'(' | b')' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            32..=126 => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out.push(')');
    out
}

/// UTF-16BE hex string with a byte-order mark: how the document information dictionary
/// holds text that is not PDFDocEncoding.
fn utf16_hex(text: &str) -> String {
    let mut out = String::from("<FEFF");
    for unit in text.encode_utf16() {
        out.push_str(&format!("{unit:04X}"));
    }
    out.push('>');
    out
}

fn text_width(bytes: &[u8], size: f64, bold: bool) -> f64 {
    bytes.iter().map(|&b| byte_width(b, bold)).sum::<f64>() * size / 1000.0
}

/// Greedy word wrap of WinAnsi text to `width` points; over-long words are cut.
fn wrap(bytes: &[u8], width: f64, size: f64, bold: bool) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    for word in bytes.split(|&b| b == b' ').filter(|w| !w.is_empty()) {
        let mut candidate = line.clone();
        if !candidate.is_empty() {
            candidate.push(b' ');
        }
        candidate.extend_from_slice(word);
        if text_width(&candidate, size, bold) <= width {
            line = candidate;
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        for &b in word {
            line.push(b);
            if text_width(&line, size, bold) > width && line.len() > 1 {
                let last = line.pop().unwrap_or(b' ');
                lines.push(std::mem::replace(&mut line, vec![last]));
            }
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Wraps text into a box: the largest of `sizes` whose lines fit `height`; at the smallest
/// size, the lines that fit with an ellipsis ending the last one.
fn fit_text(text: &str, width: f64, height: f64, sizes: &[f64], bold: bool) -> (f64, Vec<Vec<u8>>) {
    let bytes = winansi(text);
    let mut size = sizes.last().copied().unwrap_or(10.0);
    for &s in sizes {
        let lines = wrap(&bytes, width, s, bold);
        if lines.len() as f64 * s * 1.2 <= height + 0.01 {
            return (s, lines);
        }
        size = s;
    }
    let max_lines = ((height / (size * 1.2)).floor() as usize).max(1);
    let mut lines = wrap(&bytes, width, size, bold);
    lines.truncate(max_lines);
    if let Some(last) = lines.last_mut() {
        while !last.is_empty()
            && text_width(&[&last[..], &[b' ', 0x85]].concat(), size, bold) > width
        {
            last.pop();
        }
        last.extend_from_slice(&[b' ', 0x85]);
    }
    (size, lines)
}

/// Writes objects while recording their byte offsets for the cross-reference table.
struct Writer {
    buf: Vec<u8>,
    offsets: Vec<Option<usize>>,
}

impl Writer {
    fn new() -> Writer {
        // The comment with four bytes over 127 tells transfer tools the file is binary.
        let mut buf = b"%PDF-1.4\n%".to_vec();
        buf.extend_from_slice(&[0xE2, 0xE3, 0xCF, 0xD3, b'\n']);
        Writer {
            buf,
            offsets: Vec::new(),
        }
    }

    /// Allocates the next object number.
    fn reserve(&mut self) -> usize {
        self.offsets.push(None);
        self.offsets.len()
    }

    fn object(&mut self, id: usize, body: &str) {
        self.offsets[id - 1] = Some(self.buf.len());
        self.buf
            .extend_from_slice(format!("{id} 0 obj\n{body}\nendobj\n").as_bytes());
    }

    fn stream(&mut self, id: usize, dict: &str, data: &[u8]) {
        self.offsets[id - 1] = Some(self.buf.len());
        self.buf.extend_from_slice(
            format!("{id} 0 obj\n<< {dict} /Length {} >>\nstream\n", data.len()).as_bytes(),
        );
        self.buf.extend_from_slice(data);
        self.buf.extend_from_slice(b"\nendstream\nendobj\n");
    }

    fn finish(mut self, root: usize, info: usize) -> Vec<u8> {
        let xref = self.buf.len();
        let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", self.offsets.len() + 1);
        for offset in &self.offsets {
            // Every reserved object is written before finishing; a gap would be a bug here,
            // and a free entry keeps the file readable rather than pointing anywhere.
            match offset {
                Some(o) => table.push_str(&format!("{o:010} 00000 n \n")),
                None => table.push_str("0000000000 65535 f \n"),
            }
        }
        table.push_str(&format!(
            "trailer\n<< /Size {} /Root {root} 0 R /Info {info} 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            self.offsets.len() + 1
        ));
        self.buf.extend_from_slice(table.as_bytes());
        self.buf
    }
}

fn text_line(out: &mut String, font: &str, size: f64, x: f64, y: f64, bytes: &[u8]) {
    out.push_str(&format!(
        "BT /{font} {size:.1} Tf 1 0 0 1 {x:.2} {y:.2} Tm {} Tj ET\n",
        literal(bytes)
    ));
}

/// The comic as a PDF document.
pub fn comic(title: &str, panels: &[Panel]) -> Vec<u8> {
    let mut w = Writer::new();
    let catalog = w.reserve();
    let pages_id = w.reserve();
    let font_regular = w.reserve();
    let font_bold = w.reserve();
    let info = w.reserve();

    let page_count = panels.len().div_ceil(PANELS_PER_PAGE).max(1);
    let column_width = (PAGE_WIDTH - 2.0 * MARGIN - COLUMN_GAP) / 2.0;
    let (title_size, title_lines) = fit_text(
        title,
        PAGE_WIDTH - 2.0 * MARGIN,
        2.0 * 24.0,
        &[22.0, 18.0, 15.0, 12.0],
        true,
    );
    let title_block = title_lines.len() as f64 * title_size * 1.2 + 14.0;
    let footer_title = {
        let mut bytes = winansi(title);
        while text_width(&bytes, 8.0, false) > PAGE_WIDTH / 2.0 && !bytes.is_empty() {
            bytes.pop();
        }
        bytes
    };

    let mut page_ids = Vec::with_capacity(page_count);
    for page in 0..page_count {
        let page_id = w.reserve();
        let content_id = w.reserve();
        page_ids.push(page_id);
        let mut content = String::new();
        let mut top = PAGE_HEIGHT - MARGIN;
        if page == 0 {
            for (i, line) in title_lines.iter().enumerate() {
                let y = top - title_size - i as f64 * title_size * 1.2;
                text_line(&mut content, "F2", title_size, MARGIN, y, line);
            }
            top -= title_block;
        }
        let mut footer = footer_title.clone();
        footer.extend_from_slice(format!(" - page {} of {page_count}", page + 1).as_bytes());
        let footer_x = (PAGE_WIDTH - text_width(&footer, 8.0, false)) / 2.0;
        content.push_str("0.4 g\n");
        text_line(&mut content, "F1", 8.0, footer_x, MARGIN - 14.0, &footer);
        content.push_str("0 g\n");

        let bottom = MARGIN + FOOTER_HEIGHT - 14.0;
        let row_height = (top - bottom - 2.0 * ROW_GAP) / 3.0;
        let box_height = row_height - CAPTION_HEIGHT - CAPTION_GAP;
        let mut xobjects = Vec::new();
        let start = page * PANELS_PER_PAGE;
        for (slot, panel) in panels.iter().skip(start).take(PANELS_PER_PAGE).enumerate() {
            let (row, col) = (slot / 2, slot % 2);
            let x0 = MARGIN + col as f64 * (column_width + COLUMN_GAP);
            let box_top = top - row as f64 * (row_height + ROW_GAP);
            let box_bottom = box_top - box_height;
            match &panel.image {
                Some(jpeg) => {
                    let scale =
                        (column_width / jpeg.width as f64).min(box_height / jpeg.height as f64);
                    let (iw, ih) = (jpeg.width as f64 * scale, jpeg.height as f64 * scale);
                    let ix = x0 + (column_width - iw) / 2.0;
                    let iy = box_top - ih;
                    let image_id = w.reserve();
                    w.stream(
                        image_id,
                        &format!(
                            "/Type /XObject /Subtype /Image /Width {} /Height {} \
                             /ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter /DCTDecode",
                            jpeg.width, jpeg.height
                        ),
                        &jpeg.bytes,
                    );
                    let name = format!("Im{}", panel.number);
                    content.push_str(&format!(
                        "q {iw:.2} 0 0 {ih:.2} {ix:.2} {iy:.2} cm /{name} Do Q\n\
                         q 0.3 G 0.75 w {ix:.2} {iy:.2} {iw:.2} {ih:.2} re S Q\n"
                    ));
                    xobjects.push(format!("/{name} {image_id} 0 R"));
                }
                None => {
                    content.push_str(&format!(
                        "q 0.94 g {x0:.2} {box_bottom:.2} {column_width:.2} {box_height:.2} re f Q\n\
                         q 0.6 G 0.75 w {x0:.2} {box_bottom:.2} {column_width:.2} {box_height:.2} re S Q\n"
                    ));
                    let note = winansi(&format!("Frame {}: {}", panel.number, panel.placeholder));
                    let nx = x0 + (column_width - text_width(&note, 9.0, false)).max(0.0) / 2.0;
                    content.push_str("0.35 g\n");
                    text_line(
                        &mut content,
                        "F1",
                        9.0,
                        nx,
                        box_bottom + box_height / 2.0,
                        &note,
                    );
                    content.push_str("0 g\n");
                }
            }
            let (size, lines) = fit_text(
                &panel.caption,
                column_width,
                CAPTION_HEIGHT,
                &[10.0, 9.0, 8.0, 7.0],
                false,
            );
            for (i, line) in lines.iter().enumerate() {
                let lx = x0 + (column_width - text_width(line, size, false)).max(0.0) / 2.0;
                let ly = box_bottom - CAPTION_GAP - size - i as f64 * size * 1.2;
                text_line(&mut content, "F1", size, lx, ly, line);
            }
        }
        w.stream(content_id, "", content.as_bytes());
        w.object(
            page_id,
            &format!(
                "<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 {PAGE_WIDTH} {PAGE_HEIGHT}] \
                 /Resources << /Font << /F1 {font_regular} 0 R /F2 {font_bold} 0 R >> \
                 /XObject << {} >> >> /Contents {content_id} 0 R >>",
                xobjects.join(" ")
            ),
        );
    }

    let kids: Vec<String> = page_ids.iter().map(|id| format!("{id} 0 R")).collect();
    w.object(
        pages_id,
        &format!(
            "<< /Type /Pages /Kids [{}] /Count {page_count} >>",
            kids.join(" ")
        ),
    );
    w.object(
        font_regular,
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    );
    w.object(
        font_bold,
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
    );
    w.object(
        info,
        &format!(
            "<< /Title {} /Producer (storygpt-v) /Creator (storygpt-v) >>",
            utf16_hex(title)
        ),
    );
    w.object(
        catalog,
        &format!("<< /Type /Catalog /Pages {pages_id} 0 R >>"),
    );
    w.finish(catalog, info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_and_winansi_safe() {
        assert_eq!(literal(&winansi(r"a (b) \c")), r"(a \(b\) \\c)");
        // é is Latin-1 (octal 351), the curly quote is WinAnsi 0x92, CJK and emoji become ?.
        assert_eq!(literal(&winansi("é’漢😀")), r"(\351\222??)");
        assert_eq!(winansi("tab\there"), b"tab here");
    }

    #[test]
    fn wrapping_respects_the_width() {
        let lines = wrap(
            &winansi("Fred opens the door and waves at Wilma"),
            100.0,
            10.0,
            false,
        );
        assert!(lines.len() > 1);
        for line in &lines {
            assert!(text_width(line, 10.0, false) <= 100.0);
        }
        let (size, lines) = fit_text(&"word ".repeat(400), 200.0, 50.0, &[10.0, 7.0], false);
        assert_eq!(size, 7.0);
        assert_eq!(lines.len(), 5);
        assert!(lines[4].ends_with(&[b' ', 0x85]));
    }

    #[test]
    fn cross_reference_offsets_point_at_their_objects() {
        let jpeg = Jpeg {
            bytes: vec![0xFF, 0xD8, 0xFF, 0xD9],
            width: 1,
            height: 1,
        };
        let panels: Vec<Panel> = (1..=7)
            .map(|n| Panel {
                number: n,
                caption: format!("Caption {n} (with parens)"),
                image: (n != 3).then(|| jpeg.clone()),
                placeholder: "not generated yet".into(),
            })
            .collect();
        let pdf = comic("Title", &panels);
        // Binary JPEG bytes make the file non-UTF-8; the tail from `startxref` is ASCII.
        let tail_at = pdf.windows(10).rposition(|w| w == b"startxref\n").unwrap();
        let tail = std::str::from_utf8(&pdf[tail_at..]).unwrap();
        let startxref: usize = tail.lines().nth(1).unwrap().parse().unwrap();
        assert!(pdf[startxref..].starts_with(b"xref\n0 "));
        let table = std::str::from_utf8(&pdf[startxref..tail_at]).unwrap();
        let entries: Vec<&str> = table
            .lines()
            .skip(3)
            .take_while(|l| !l.starts_with("trailer"))
            .collect();
        assert!(entries.len() > 10);
        for (i, entry) in entries.iter().enumerate() {
            assert_eq!(
                entry.len(),
                19,
                "xref entries are 20 bytes with the newline"
            );
            let offset: usize = entry[..10].parse().unwrap();
            assert!(
                pdf[offset..].starts_with(format!("{} 0 obj", i + 1).as_bytes()),
                "object {}",
                i + 1
            );
        }
        let text = String::from_utf8_lossy(&pdf);
        assert_eq!(text.matches("/Subtype /Image").count(), 6);
        assert!(text.contains("/Count 2"));
        assert!(text.contains("(Frame 3: not generated yet)"));
        assert!(text.ends_with("%%EOF\n"));
    }
}
