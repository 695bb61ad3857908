#!/usr/bin/env python3
"""Generates the malformed (and tricky-but-valid) safetensors corpus used by tests/io/io_malformed_test.cpp
and as the fuzzer's seed corpus. The generated files are committed (python is not needed to run the
tests); re-run this script after editing it:  python3 tests/data/malformed/make_corpus.py

expected.tsv: <file> TAB <substring the error message must contain>, or OK for files that must load
(every tensor readable). Messages are "<file>: header: <reason>" / "<file>: tensor '<name>': <reason>".
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
cases = []  # (name, bytes, expected)


def raw(header: bytes, data: bytes = b"", hlen=None) -> bytes:
    return struct.pack("<Q", len(header) if hlen is None else hlen) + header + data


def st(entries: str, data: bytes = b"") -> bytes:
    """entries: the JSON text of the header (given verbatim so order/duplicates are under control)."""
    return raw(entries.encode("utf-8"), data)


def add(name, content, expected):
    cases.append((name, content, expected))


F32_1 = struct.pack("<f", 1.0)
F32_3 = struct.pack("<3f", 1.0, 2.0, 3.0)
A4 = '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'

# --- container / header length
add("empty_file", b"", "header: empty file")
add("seven_bytes", b"\x02\x00\x00\x00\x00\x00\x00", "header: file is 7 bytes, too short for the 8-byte header length")
add("header_len_past_eof", raw(b"{}", hlen=1000), "header: header length 1000 runs past the end of the file")
add("header_len_over_limit", raw(b"{}", hlen=200_000_000), "header: header length 200000000 exceeds the 100000000-byte limit")
add("header_len_u64_max", raw(b"{}", hlen=2**64 - 1), "header: header length 18446744073709551615 exceeds")
add("header_len_zero", raw(b"", b"{}", hlen=0), "header: not valid JSON")
add("only_length", raw(b"", hlen=8), "header: header length 8 runs past the end of the file (8 bytes)")
# --- JSON level
add("not_json", st('{"a": '), "header: not valid JSON")
add("json_trailing_garbage", st('{} xyz'), "header: not valid JSON")
add("invalid_utf8_key", raw(b'{"\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_1), "header: not valid JSON")
add("not_object_array", st('[1,2]'), "header: not a JSON object (got array)")
add("not_object_string", st('"safetensors"'), "header: not a JSON object (got string)")
add("nested_too_deep", st('{"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}}', F32_1), "tensor 'a': JSON nested deeper than a safetensors header allows")
add("nested_root_array", st('[[[[[[1]]]]]]'), "header: JSON nested deeper than a safetensors header allows")
add("duplicate_tensor", st('{' + A4 + ',"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', F32_1 * 2), "tensor 'a': duplicate tensor name")
add("duplicate_field", st('{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}', F32_1), "tensor 'a': duplicate field 'dtype'")
add("duplicate_metadata_key", st('{"__metadata__":{"k":"1","k":"2"},' + A4 + '}', F32_1), "header: __metadata__: duplicate key 'k'")
add("duplicate_metadata", st('{"__metadata__":{},"__metadata__":{},' + A4 + '}', F32_1), "header: duplicate key '__metadata__'")
# --- __metadata__
add("metadata_not_object", st('{"__metadata__":["x"],' + A4 + '}', F32_1), "header: __metadata__ is not an object (got array)")
add("metadata_non_string", st('{"__metadata__":{"epoch":3},' + A4 + '}', F32_1), "header: __metadata__ key 'epoch': value is not a string (got number)")
# --- entries
add("entry_not_object", st('{"a":5}'), "tensor 'a': entry is not a JSON object (got number)")
add("missing_field", st('{"a":{"dtype":"F32","data_offsets":[0,4]}}', F32_1), "tensor 'a': missing field 'shape'")
add("extra_field", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"stride":[1]}}', F32_1), "tensor 'a': unexpected field 'stride'")
add("unknown_dtype", st('{"a":{"dtype":"F17","shape":[1],"data_offsets":[0,4]}}', F32_1), "tensor 'a': unknown dtype 'F17'")
add("dtype_not_string", st('{"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}}', F32_1), "tensor 'a': dtype is not a string (got number)")
add("shape_not_array", st('{"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}}', F32_1), "tensor 'a': shape is not an array (got number)")
add("negative_dim", st('{"a":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}}', F32_1 * 6), "tensor 'a': negative shape dimension -2")
add("float_dim", st('{"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,10]}}', b"\0" * 10), "tensor 'a': shape dimension 2.5 is not an integer")
add("string_dim", st('{"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}}', F32_1 * 2), "tensor 'a': shape dimension is not an integer (got string)")
add("dim_too_large", st('{"a":{"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,1]}}', b"\0"), "tensor 'a': shape dimension 9223372036854775808 is too large")
add("shape_overflow", st('{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,1]}}', b"\0"), "tensor 'a': shape [4294967296, 4294967296]: element count overflows 64 bits")
add("shape_overflow_with_zero", st('{"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}'), "element count overflows 64 bits")
add("bytes_overflow", st('{"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}}', b"\0" * 8), "tensor 'a': shape [4611686018427387904]: byte size overflows 64 bits")
add("wrong_byte_length", st('{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}', b"\0" * 20), "tensor 'a': wrong byte length: data_offsets [0, 20] span 20 bytes but shape [2, 3] of F32 needs 24")
add("begin_gt_end", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}', b"\0" * 8), "tensor 'a': data_offsets begin 8 > end 4")
add("negative_offset", st('{"a":{"dtype":"F32","shape":[2],"data_offsets":[-4,4]}}', b"\0" * 8), "tensor 'a': negative data_offsets begin -4")
add("float_offset", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4]}}', F32_1), "tensor 'a': data_offsets begin 0.0 is not an integer")
add("offset_beyond_u64", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551616]}}', F32_1), "tensor 'a': data_offsets end 1.8446744073709552e+19 is not an integer in the 64-bit range")
add("offsets_string", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}}', F32_1), "tensor 'a': data_offsets begin is not an integer (got string)")
add("offsets_not_pair", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}', F32_1), "tensor 'a': data_offsets is not an array [begin, end] (got 1 elements)")
add("offsets_object", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":{"begin":0}}}', F32_1), "tensor 'a': data_offsets is not an array [begin, end] (got object)")
# --- tiling of the data buffer
add("overlap", st('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12), "tensor 'b': data_offsets [4, 12] overlap tensor 'a' (ends at 8)")
add("same_offsets", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8), "tensor 'b': data_offsets [0, 4] overlap tensor 'a'")
add("empty_inside_other", st('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}', b"\0" * 8), "tensor 'e': data_offsets [4, 4] overlap tensor 'a'")
add("gap", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', b"\0" * 12), "tensor 'b': gap of 4 unused bytes before it")
add("gap_at_start", st('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8), "tensor 'a': gap of 4 unused bytes before it")
add("data_past_end", st('{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8), "tensor 'a': data_offsets end 16 is past the end of the data buffer (8 bytes)")
hdr2 = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}'
add("truncated_data", st(hdr2, b"\0" * 24)[:-5], "tensor 'b': data_offsets end 24 is past the end of the data buffer (19 bytes)")
add("trailing_bytes", st('{' + A4 + '}', F32_1 + b"junk"), "header: 4 trailing bytes after the last tensor")
add("no_tensors_trailing", st('{}', b"\0" * 3), "header: 3 trailing bytes after the last tensor")
add("bool_bad_byte", st('{"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}}', b"\x01\x00\x02"), "tensor 'm': BOOL element 2 has byte value 2")
add("control_chars_in_name", st('{"a\\nb":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}', F32_1), "tensor 'a\\x0Ab': unexpected field 'x'")

# --- tricky but valid: must load
add("valid_unsorted_offsets", st('{"z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[3],"data_offsets":[4,16]}}', F32_1 + F32_3), "OK")
add("valid_unaligned", st('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}', F32_3), "OK")  # header length 55: data at odd offset
add("valid_zero_size", st('{"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F32_1), "OK")
add("valid_metadata_null", st('{"__metadata__":null,' + A4 + '}', F32_1), "OK")
add("valid_empty_header", st('{}'), "OK")
add("valid_padded_header", st('{' + A4 + '}      ', F32_1), "OK")


def main():
    for f in os.listdir(HERE):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(HERE, f))
    names = set()
    with open(os.path.join(HERE, "expected.tsv"), "w") as out:
        for name, content, expected in cases:
            assert name not in names, name
            names.add(name)
            with open(os.path.join(HERE, name + ".safetensors"), "wb") as f:
                f.write(content)
            out.write(f"{name}.safetensors\t{expected}\n")
    print(f"{len(cases)} files ({sum(e != 'OK' for _, _, e in cases)} malformed)")


if __name__ == "__main__":
    main()
