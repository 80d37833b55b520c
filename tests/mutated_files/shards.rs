//! Mutated shard folders (index, shard files, labels) against their definition.

use super::*;

/// A shard folder's records read from its index's definition: the shards in order, each `count` records of
/// `channels * size * size` bytes in a file of exactly that size, and one little-endian u16 label per record,
/// each below the class count; every file name a plain name in the folder.
fn shards_independent(dir: &Path) -> Option<Vec<(Vec<u8>, u32)>> {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).ok()?;
    let u = |v: &serde_json::Value| v.as_u64().map(|x| x as usize);
    let (c, s, rec) = (u(&idx["channels"])?, u(&idx["size"])?, u(&idx["record_bytes"])?);
    if idx["format"] != "asge-shards" || idx["version"] != 1 || !(c == 1 || c == 3) || s == 0 || s > 1 << 14 {
        return None;
    }
    if c.checked_mul(s)?.checked_mul(s)? != rec {
        return None;
    }
    let classes = idx["classes"].as_array()?.len();
    let plain = |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\0');
    let labels_file = idx["labels_file"].as_str()?;
    if classes == 0 || !plain(labels_file) {
        return None;
    }
    let mut records = Vec::new();
    for sh in idx["shards"].as_array()? {
        let (file, first, count) = (sh["file"].as_str()?, u(&sh["first"])?, u(&sh["count"])?);
        if !plain(file) || first != records.len() {
            return None;
        }
        let bytes = std::fs::read(dir.join(file)).ok()?;
        if bytes.len() != count.checked_mul(rec)? {
            return None;
        }
        records.extend(bytes.chunks(rec).map(|r| r.to_vec()));
    }
    if records.len() != u(&idx["count"])? {
        return None;
    }
    let lb = std::fs::read(dir.join(labels_file)).ok()?;
    if lb.len() != 2 * records.len() {
        return None;
    }
    let labels: Vec<u32> = lb.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
    if labels.iter().any(|&l| l as usize >= classes) {
        return None;
    }
    Some(records.into_iter().zip(labels).collect())
}

#[derive(Clone, Debug)]
enum ShardEdit {
    /// Set an index field (by JSON pointer) to a number.
    Number(&'static str, i64),
    Huge(&'static str),
    Text(&'static str, &'static str),
    /// Mutate a file's bytes.
    File(&'static str, Vec<Mutation>),
    /// Mutate index.json's text.
    IndexBytes(Vec<Mutation>),
}

fn shard_edit() -> impl Strategy<Value = ShardEdit> {
    let field = prop_oneof![
        Just("/count"),
        Just("/channels"),
        Just("/size"),
        Just("/record_bytes"),
        Just("/shards/0/count"),
        Just("/shards/1/first"),
        Just("/shards/2/count"),
        Just("/version"),
    ];
    let file_field = prop_oneof![Just("/shards/0/file"), Just("/labels_file"), Just("/shards/1/file")];
    let name = prop_oneof![
        Just("../index.json"),
        Just("/etc/passwd"),
        Just(""),
        Just("."),
        Just("shard-00000.bin"),
        Just("labels.u16")
    ];
    prop_oneof![
        (field.clone(), -3i64..40).prop_map(|(f, v)| ShardEdit::Number(f, v)),
        field.prop_map(ShardEdit::Huge),
        (file_field, name).prop_map(|(f, n)| ShardEdit::Text(f, n)),
        (prop_oneof![Just("shard-00000.bin"), Just("labels.u16"), Just("shard-00002.bin")], mutations())
            .prop_map(|(f, m)| ShardEdit::File(f, m)),
        mutations().prop_map(ShardEdit::IndexBytes),
    ]
}

#[test]
fn mutated_shard_folders() {
    in_child("shards::mutated_shard_folders", || {
        let base = case_dir("shard-base");
        for c in 0..2 {
            std::fs::create_dir_all(base.join(format!("in/c{c}"))).unwrap();
            for k in 0..3 {
                image::RgbImage::from_fn(10, 10, |x, y| image::Rgb([(x + k) as u8, (y * c) as u8, 9]))
                    .save(base.join(format!("in/c{c}/{k}.png")))
                    .unwrap();
            }
        }
        let o = asge::data::shard::ShardOptions {
            size: 4,
            resize: asge::data::imagefolder::ResizeMode::Squash,
            shard_bytes: 2 * 48,
            quiet: true,
        };
        asge::data::shard::write_shards(&base.join("in"), &base.join("out"), &o).unwrap();
        let files = ["index.json", "labels.u16", "shard-00000.bin", "shard-00001.bin", "shard-00002.bin"];
        let dir = case_dir("shard-case");
        let tally = Tally::default();
        runner()
            .run(&prop::collection::vec(shard_edit(), 1..3), |edits| {
                for f in files {
                    std::fs::copy(base.join("out").join(f), dir.join(f)).unwrap();
                }
                for e in &edits {
                    let ip = dir.join("index.json");
                    let mut idx: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap_or_default();
                    match e {
                        ShardEdit::Number(f, v) => {
                            if let Some(x) = idx.pointer_mut(f) {
                                *x = (*v).into();
                            }
                        }
                        ShardEdit::Huge(f) => {
                            if let Some(x) = idx.pointer_mut(f) {
                                *x = u64::MAX.into();
                            }
                        }
                        ShardEdit::Text(f, t) => {
                            if let Some(x) = idx.pointer_mut(f) {
                                *x = (*t).into();
                            }
                        }
                        ShardEdit::File(f, m) => {
                            let b = std::fs::read(dir.join(f)).unwrap();
                            std::fs::write(dir.join(f), apply(&b, m)).unwrap();
                            continue;
                        }
                        ShardEdit::IndexBytes(m) => {
                            let b = std::fs::read(&ip).unwrap();
                            std::fs::write(&ip, apply(&b, m)).unwrap();
                            continue;
                        }
                    }
                    std::fs::write(&ip, serde_json::to_vec(&idx).unwrap()).unwrap();
                }
                let got = asge::data::shard::ShardSet::open(&dir).map(|set| {
                    use asge::data::ImageSource;
                    (0..set.len()).map(|i| (set.image(i).to_vec(), set.label(i))).collect::<Vec<_>>()
                });
                judge(&tally, got, shards_independent(&dir), Some(&dir), |_| false)
            })
            .unwrap();
    });
}
