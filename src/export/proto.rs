//! The few ONNX protobuf messages an exported model needs, encoded by hand (field numbers from onnx.proto, ONNX
//! 1.17; protobuf's wire format: a varint key `field << 3 | wire type`, then a varint or a length-delimited body).
//!
//! Why not a crate: the graph needs seven message types and writes them only; `onnx-protobuf` pulls in the
//! `protobuf` 3 runtime and its code generator's output for all of onnx.proto, and prost needs `protoc` or a
//! vendored generated file. Eighty lines here are easier to check against onnx.proto than either, and the CI
//! check (onnxruntime and `onnx.checker` read the file) proves them.

/// A message under construction: its encoded fields.
#[derive(Default, Clone)]
pub struct Msg(Vec<u8>);

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Msg {
    pub fn new() -> Self {
        Msg(Vec::new())
    }
    /// A varint field (int32, int64, enum). Negative values are encoded as 10-byte two's complement, as protobuf
    /// does for int64.
    pub fn int(mut self, field: u32, v: i64) -> Self {
        varint(&mut self.0, (field as u64) << 3);
        varint(&mut self.0, v as u64);
        self
    }
    /// A 32-bit float field (wire type 5).
    pub fn float(mut self, field: u32, v: f32) -> Self {
        varint(&mut self.0, (field as u64) << 3 | 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length-delimited field: bytes, a string or an embedded message.
    pub fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        varint(&mut self.0, (field as u64) << 3 | 2);
        varint(&mut self.0, b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }
    pub fn msg(self, field: u32, m: &Msg) -> Self {
        self.bytes(field, &m.0)
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

// Field numbers (onnx.proto).
pub mod field {
    pub const MODEL_IR_VERSION: u32 = 1;
    pub const MODEL_PRODUCER_NAME: u32 = 2;
    pub const MODEL_PRODUCER_VERSION: u32 = 3;
    pub const MODEL_DOC_STRING: u32 = 6;
    pub const MODEL_GRAPH: u32 = 7;
    pub const MODEL_OPSET_IMPORT: u32 = 8;
    pub const MODEL_METADATA_PROPS: u32 = 14;
    pub const ENTRY_KEY: u32 = 1;
    pub const ENTRY_VALUE: u32 = 2;
    pub const OPSET_DOMAIN: u32 = 1;
    pub const OPSET_VERSION: u32 = 2;
    pub const GRAPH_NODE: u32 = 1;
    pub const GRAPH_NAME: u32 = 2;
    pub const GRAPH_INITIALIZER: u32 = 5;
    pub const GRAPH_INPUT: u32 = 11;
    pub const GRAPH_OUTPUT: u32 = 12;
    pub const NODE_INPUT: u32 = 1;
    pub const NODE_OUTPUT: u32 = 2;
    pub const NODE_NAME: u32 = 3;
    pub const NODE_OP_TYPE: u32 = 4;
    pub const NODE_ATTRIBUTE: u32 = 5;
    pub const ATTR_NAME: u32 = 1;
    pub const ATTR_I: u32 = 3;
    pub const ATTR_INTS: u32 = 8;
    pub const ATTR_TYPE: u32 = 20;
    pub const TENSOR_DIMS: u32 = 1;
    pub const TENSOR_DATA_TYPE: u32 = 2;
    pub const TENSOR_NAME: u32 = 8;
    pub const TENSOR_RAW_DATA: u32 = 9;
    pub const VALUE_NAME: u32 = 1;
    pub const VALUE_TYPE: u32 = 2;
    pub const TYPE_TENSOR: u32 = 1;
    pub const TENSOR_TYPE_ELEM: u32 = 1;
    pub const TENSOR_TYPE_SHAPE: u32 = 2;
    pub const SHAPE_DIM: u32 = 1;
    pub const DIM_VALUE: u32 = 1;
    pub const DIM_PARAM: u32 = 2;
}

/// `TensorProto.DataType`.
pub const FLOAT: i64 = 1;
pub const INT64: i64 = 7;
/// `AttributeProto.AttributeType`.
pub const ATTR_INT: i64 = 2;
pub const ATTR_INTS: i64 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_matches_protobuf() {
        // Field 1 varint 150: 08 96 01 (protobuf's encoding guide); field 2 string "testing": 12 07 ...
        assert_eq!(Msg::new().int(1, 150).into_bytes(), [0x08, 0x96, 0x01]);
        assert_eq!(Msg::new().str(2, "testing").into_bytes(), b"\x12\x07testing");
        // int64 -1: ten bytes.
        assert_eq!(Msg::new().int(1, -1).into_bytes().len(), 11);
        assert_eq!(Msg::new().float(2, 1.0).into_bytes(), [0x15, 0, 0, 0x80, 0x3f]);
    }
}
