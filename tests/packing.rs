//! Packing several documents per row (`[data] packing = "documents"`): a packed row gives each
//! document exactly the logits it gets alone, in every family, on the CPU backend's kernels.
//! (tests/backends.rs checks the same on wgpu and libtorch, where the block-diagonal mask
//! takes the eager and fused attention paths.)

mod common;

use burn::tensor::Device;

#[test]
fn a_packed_row_gives_each_document_its_logits_alone_in_every_family() {
    let device = Device::flex();
    for name in [
        "roberta-tiny",
        "bert-tiny",
        "xlmr-tiny",
        "modernbert-tiny",
        "modernbert-tiny-old",
    ] {
        let model = common::fixture_masked_lm(name, &device);
        let worst = common::assert_packed_rows_equal_documents_alone(&model, &device, name);
        eprintln!("{name}: packed vs alone, largest relative difference {worst:e}");
    }
}
