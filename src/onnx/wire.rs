//! A pre-scan of the protobuf wire format before decoding, with an explicit stack: the decoder
//! (rust-protobuf) skips unknown group fields recursively with no depth limit, so a file of
//! a million nested group tags overflows the stack and aborts the process. ONNX has no group
//! fields, so a group anywhere in a message the scan walks is refused; known sub-messages are
//! walked (with the table [`sub_message`], taken from `onnx.proto` as onnx-protobuf 0.2.3
//! decodes it; its generated code has no reflection) to at most [`MAX_DEPTH`] levels, which
//! also bounds every recursive walk over the decoded model (subgraphs inside attributes inside
//! nodes). Unknown length-delimited fields are kept as opaque bytes by the decoder and are
//! skipped here.

/// The ONNX messages that contain other messages (and those that do not, as `Leaf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    Model,
    Graph,
    Node,
    Attribute,
    ValueInfo,
    Type,
    TypeTensor,
    TypeSequence,
    TypeMap,
    TypeOptional,
    TensorShape,
    Tensor,
    SparseTensor,
    TrainingInfo,
    Function,
    TensorAnnotation,
    /// StringStringEntryProto, OperatorSetIdProto, Dimension, Segment: no sub-messages.
    Leaf,
}

/// The message type of field `number` of `m`, when that field is a message.
pub fn sub_message(m: Msg, number: u32) -> Option<Msg> {
    use Msg::*;
    Some(match (m, number) {
        (Model, 7) => Graph,
        (Model, 8 | 14) => Leaf,
        (Model, 20) => TrainingInfo,
        (Model, 25) => Function,
        (Graph, 1) => Node,
        (Graph, 5) => Tensor,
        (Graph, 15) => SparseTensor,
        (Graph, 11..=13) => ValueInfo,
        (Graph, 14) => TensorAnnotation,
        (Graph, 16) => Leaf,
        (Node, 5) => Attribute,
        (Node, 9) => Leaf,
        (Attribute, 5 | 10) => Tensor,
        (Attribute, 6 | 11) => Graph,
        (Attribute, 22 | 23) => SparseTensor,
        (Attribute, 14 | 15) => Type,
        (ValueInfo, 2) => Type,
        (ValueInfo, 4) => Leaf,
        (Type, 1 | 8) => TypeTensor,
        (Type, 4) => TypeSequence,
        (Type, 5) => TypeMap,
        (Type, 9) => TypeOptional,
        (TypeTensor, 2) => TensorShape,
        (TypeSequence, 1) | (TypeOptional, 1) | (TypeMap, 2) => Type,
        (TensorShape, 1) => Leaf,
        (Tensor, 3 | 13 | 16) => Leaf,
        (SparseTensor, 1 | 2) => Tensor,
        (TrainingInfo, 1 | 2) => Graph,
        (TrainingInfo, 3 | 4) => Leaf,
        (Function, 7) => Node,
        (Function, 11) => Attribute,
        (Function, 12) => ValueInfo,
        (Function, 9 | 14) => Leaf,
        (TensorAnnotation, 2) => Leaf,
        _ => return None,
    })
}

/// Nesting of messages the scan (and then the decoder) accepts; rust-protobuf's own default.
pub const MAX_DEPTH: usize = 100;

fn varint(bytes: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for k in 0..10 {
        let b = *bytes
            .get(*pos)
            .ok_or_else(|| format!("a varint runs past the end at byte {}", *pos))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * k);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(format!(
        "a varint longer than 10 bytes ends at byte {}",
        *pos
    ))
}

/// Checks that `bytes`, read as a `root` message, has no group fields and nests known messages
/// at most [`MAX_DEPTH`] deep. Truncations and bad lengths are left to the decoder, which
/// reports them; this only refuses what would crash it.
pub fn prescan(bytes: &[u8], root: Msg) -> Result<(), String> {
    // (message type, end of its bytes)
    let mut stack: Vec<(Msg, usize)> = vec![(root, bytes.len())];
    let mut pos = 0usize;
    while let Some(&(md, end)) = stack.last() {
        if pos >= end {
            stack.pop();
            continue;
        }
        let tag = varint(bytes, &mut pos)?;
        let number = (tag >> 3) as u32;
        match tag & 7 {
            0 => {
                varint(bytes, &mut pos)?;
            }
            1 => pos = pos.saturating_add(8),
            5 => pos = pos.saturating_add(4),
            2 => {
                let len = usize::try_from(varint(bytes, &mut pos)?).unwrap_or(usize::MAX);
                let field_end = pos.saturating_add(len);
                if field_end > end {
                    return Ok(()); // the decoder reports the bad length
                }
                match sub_message(md, number) {
                    Some(sub) => {
                        if stack.len() >= MAX_DEPTH {
                            return Err(format!(
                                "messages nest more than {MAX_DEPTH} levels deep (field {number} of {md:?} at byte {pos})"
                            ));
                        }
                        stack.push((sub, field_end));
                    }
                    None => pos = field_end,
                }
            }
            3 | 4 => {
                return Err(format!(
                    "a protobuf group (field {number} of {md:?}) at byte {pos}: ONNX has no group fields"
                ))
            }
            w => return Err(format!("wire type {w} at byte {pos} does not exist")),
        }
        if pos > end {
            return Ok(()); // the decoder reports the truncation
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::ModelProto;
    use protobuf::Message;

    #[test]
    fn groups_are_refused_and_models_pass() {
        let mut m = ModelProto::new();
        m.ir_version = 8;
        m.producer_name = "x".into();
        let mut bytes = m.write_to_bytes().unwrap();
        assert!(prescan(&bytes, Msg::Model).is_ok());
        bytes.extend(std::iter::repeat_n(0x0bu8, 100_000)); // field 1, start group
        let e = prescan(&bytes, Msg::Model).unwrap_err();
        assert!(e.contains("group"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        // graph (7) -> node (1) -> attribute (5) -> g (6) -> node ... nested 200 times
        let mut inner: Vec<u8> = Vec::new();
        for level in 0..200 {
            // outermost (level 199) first: node, attribute, g, node, ...
            let field = match level % 3 {
                1 => 0x0a, // GraphProto.node = 1
                0 => 0x2a, // NodeProto.attribute = 5
                _ => 0x32, // AttributeProto.g = 6
            };
            let mut outer = vec![field];
            let mut len = inner.len();
            loop {
                let b = (len & 0x7f) as u8;
                len >>= 7;
                outer.push(if len > 0 { b | 0x80 } else { b });
                if len == 0 {
                    break;
                }
            }
            outer.extend(inner);
            inner = outer;
        }
        // inner is a GraphProto's node list...; wrap into ModelProto.graph (7)
        let mut bytes = vec![0x3a];
        let mut len = inner.len();
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            bytes.push(if len > 0 { b | 0x80 } else { b });
            if len == 0 {
                break;
            }
        }
        bytes.extend(inner);
        let e = prescan(&bytes, Msg::Model).unwrap_err();
        assert!(e.contains("nest"), "{e}");
    }
}
