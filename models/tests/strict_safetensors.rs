//! Adversarial tests for the strict safetensors parser: every malformed-file class gets its own
//! error kind, and no input panics.

use securerun_models::strict_safetensors::{parse, Dtype, HeaderError, Limits};

/// A file image: 8-byte length, header text, then `data_len` bytes of data.
fn file(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0xABu8, data_len));
    v
}

fn err(bytes: &[u8]) -> HeaderError {
    parse(bytes, &Limits::default()).expect_err("must be rejected")
}

const VALID: &str = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]},"a":{"dtype":"BF16","shape":[8],"data_offsets":[0,16]}}"#;

#[test]
fn valid_file_parses_in_data_order() {
    let h = parse(&file(VALID, 32), &Limits::default()).unwrap();
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensors[0].name, "a");
    assert_eq!(h.tensors[0].dtype, Dtype::BF16);
    assert_eq!(h.tensors[1].shape, vec![2, 2]);
    assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
    assert_eq!(h.data_start(), 8 + VALID.len() as u64);
}

#[test]
fn header_padding_and_zero_sized_tensors_are_fine() {
    let hdr = format!(
        "{}   ",
        r#"{"z":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#
    );
    let h = parse(&file(&hdr, 4), &Limits::default()).unwrap();
    assert_eq!(h.tensors.len(), 2);
    // An empty file with no tensors at all is also a valid safetensors file.
    assert!(parse(&file("{}", 0), &Limits::default())
        .unwrap()
        .tensors
        .is_empty());
}

#[test]
fn too_small_files() {
    assert_eq!(err(&[]), HeaderError::FileTooSmall { len: 0 });
    assert_eq!(err(&[1, 0, 0]), HeaderError::FileTooSmall { len: 3 });
}

#[test]
fn header_length_cap_is_enforced_and_configurable() {
    let bytes = file(VALID, 32);
    let small = Limits {
        max_header_len: 64,
        ..Limits::default()
    };
    assert!(matches!(
        parse(&bytes, &small),
        Err(HeaderError::HeaderTooLarge { max: 64, .. })
    ));
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(matches!(err(&huge), HeaderError::HeaderTooLarge { .. }));
}

#[test]
fn header_beyond_file() {
    let mut v = 100u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    assert_eq!(
        err(&v),
        HeaderError::HeaderBeyondFile {
            header_len: 100,
            file_len: 10
        }
    );
}

#[test]
fn header_must_be_an_object() {
    assert_eq!(err(&file("", 0)), HeaderError::EmptyHeader);
    assert_eq!(
        err(&file("[]", 0)),
        HeaderError::HeaderNotObject { first: b'[' }
    );
    assert_eq!(
        err(&file(" {}", 0)),
        HeaderError::HeaderNotObject { first: b' ' }
    );
}

#[test]
fn header_not_utf8_or_not_json() {
    let mut v = 4u64.to_le_bytes().to_vec();
    v.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    assert_eq!(err(&v), HeaderError::HeaderNotUtf8 { offset: 1 });
    assert!(matches!(
        err(&file("{\"a\":", 0)),
        HeaderError::HeaderJson { .. }
    ));
    assert!(matches!(
        err(&file("{} trailing", 0)),
        HeaderError::HeaderJson { .. }
    ));
}

#[test]
fn duplicate_tensor_names() {
    let hdr = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    assert_eq!(
        err(&file(hdr, 2)),
        HeaderError::DuplicateTensor { name: "a".into() }
    );
}

#[test]
fn metadata_must_be_a_string_map_without_duplicates() {
    for bad in [
        r#"{"__metadata__":{"k":1}}"#,
        r#"{"__metadata__":{"k":{"x":"y"}}}"#,
        r#"{"__metadata__":"s"}"#,
    ] {
        assert!(
            matches!(err(&file(bad, 0)), HeaderError::MetadataNotStringMap { .. }),
            "{bad}"
        );
    }
    assert_eq!(
        err(&file(r#"{"__metadata__":{"k":"1","k":"2"}}"#, 0)),
        HeaderError::DuplicateMetadataKey { key: "k".into() }
    );
}

#[test]
fn caps_on_count_rank_and_name_length() {
    let many: Vec<String> = (0..5)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                i + 1
            )
        })
        .collect();
    let hdr = format!("{{{}}}", many.join(","));
    let limits = Limits {
        max_tensors: 4,
        ..Limits::default()
    };
    assert_eq!(
        parse(&file(&hdr, 5), &limits),
        Err(HeaderError::TooManyTensors { count: 5, max: 4 })
    );

    let rank9 = r#"{"r":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}}"#;
    assert!(matches!(
        err(&file(rank9, 1)),
        HeaderError::RankTooLarge {
            rank: 9,
            max: 8,
            ..
        }
    ));

    let long = "n".repeat(2000);
    let hdr = format!(r#"{{"{long}":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#);
    assert!(matches!(
        err(&file(&hdr, 1)),
        HeaderError::NameTooLong {
            len: 2000,
            max: 1024,
            ..
        }
    ));

    let empty = r#"{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
    assert_eq!(err(&file(empty, 1)), HeaderError::EmptyName);
}

#[test]
fn bad_tensor_entries_name_the_tensor() {
    let cases = [
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#,
        r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
        r#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#,
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
        r#"{"w":[1,2,3]}"#,
    ];
    for c in cases {
        match err(&file(c, 4)) {
            HeaderError::InvalidTensorEntry { tensor, .. } => assert_eq!(tensor, "w", "{c}"),
            other => panic!("{c}: {other:?}"),
        }
    }
    let e = err(&file(
        r#"{"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
        1,
    ));
    assert_eq!(
        e,
        HeaderError::UnsupportedDtype {
            tensor: "w".into(),
            dtype: "F4".into()
        }
    );
    assert!(e.to_string().contains("\"w\""));
}

#[test]
fn offsets_and_sizes_are_checked() {
    let reversed = r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#;
    assert!(matches!(
        err(&file(reversed, 4)),
        HeaderError::ReversedOffsets {
            begin: 4,
            end: 0,
            ..
        }
    ));

    let overflow = r#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
    assert!(matches!(
        err(&file(overflow, 8)),
        HeaderError::SizeOverflow { .. }
    ));

    let mismatch = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    assert_eq!(
        err(&file(mismatch, 8)),
        HeaderError::SizeMismatch {
            tensor: "w".into(),
            expected: 12,
            actual: 8
        }
    );

    let oob = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    assert_eq!(
        err(&file(oob, 8)),
        HeaderError::TensorOutOfBounds {
            tensor: "w".into(),
            end: 16,
            data_len: 8
        }
    );
}

#[test]
fn layout_must_tile_the_data_section() {
    let gap_at_start = r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
    assert_eq!(
        err(&file(gap_at_start, 8)),
        HeaderError::Gap {
            tensor: "w".into(),
            expected: 0,
            begin: 4
        }
    );
    let gap_between = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#;
    assert!(matches!(
        err(&file(gap_between, 6)),
        HeaderError::Gap {
            expected: 2,
            begin: 4,
            ..
        }
    ));

    let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    assert_eq!(
        err(&file(overlap, 6)),
        HeaderError::Overlap {
            tensor: "b".into(),
            begin: 2,
            previous: "a".into(),
            previous_end: 4
        }
    );
    let alias = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    assert!(matches!(err(&file(alias, 4)), HeaderError::Overlap { .. }));

    let trailing = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    assert_eq!(
        err(&file(trailing, 7)),
        HeaderError::TrailingBytes {
            trailing: 3,
            covered: 4,
            data_len: 7
        }
    );
}

/// Deterministic mutation fuzzing: flipping, truncating and extending a valid file must never
/// panic, whatever the result.
#[test]
fn mutations_never_panic() {
    let base = file(VALID, 32);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut rejected = 0;
    for _ in 0..20_000 {
        let mut v = base.clone();
        match next() % 4 {
            0 => {
                let i = (next() as usize) % v.len();
                v[i] = next() as u8;
            }
            1 => v.truncate((next() as usize) % v.len()),
            2 => v.extend(std::iter::repeat_n(next() as u8, (next() % 16) as usize)),
            _ => {
                let i = 8 + (next() as usize) % VALID.len();
                v[i] = b"{}[]\",:0123456789-e"[(next() % 19) as usize];
            }
        }
        if parse(&v, &Limits::default()).is_err() {
            rejected += 1;
        }
    }
    assert!(
        rejected > 10_000,
        "mutations should mostly be rejected, got {rejected}"
    );
}
