-- Cross-attention heatmaps of a frame's image: where the UNet looked for each character
-- mention of the caption the image was drawn from ("Fred", or "He" resolved to Fred).
-- They belong to the image, not to the caption: they are written in the transaction that
-- stores the image, replaced when the image is redrawn, and kept when only the caption is
-- edited (the frame is then `stale`, and so are they). Deleting the frame deletes them.
CREATE TABLE frame_attention (
    frame_id    INTEGER NOT NULL REFERENCES frames (id) ON DELETE CASCADE,
    ordinal     INTEGER NOT NULL,           -- 0-based, in caption order; the API's {k}
    text        TEXT    NOT NULL,           -- the mention as written ("He")
    characters  TEXT    NOT NULL,           -- JSON array of the names it refers to
    png         BLOB    NOT NULL,           -- frame-sized 8-bit grey heatmap
    PRIMARY KEY (frame_id, ordinal)
);
