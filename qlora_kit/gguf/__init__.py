"""GGUF export for llama.cpp, Ollama and LM Studio (`tools/export_gguf.py`), one job per module:

    export.py        the command line and the writer: hyper-parameters, tensors, metadata, one file
    model_config.py  config.json: which llama.cpp architecture, its hyper-parameters (read by every writer)
    dependency.py    the optional `gguf` package, refused with the install command when missing
    tensors.py       which safetensors tensor becomes which GGUF tensor, in which layout; read and encoded one at a time
    quantize.py      quantize_k: any quantized type's blocks, llama.cpp's quantizers on every core (imatrix or not)
    kquants.py       the Q3_K-Q6_K quantizers (ggml-quants.c transcribed, compiled with numba) and shared primitives
    block_quants.py  the 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), on kquants.py's primitives
    imatrix.py       --imatrix: llama-imatrix's importance matrix through the merged model, its file formats
    tokenizer.py     vocabulary, merges, special tokens, chat template and llama.cpp's pre-tokenizer name
    modelfile.py     the Ollama Modelfile in the model's own chat format, with its stop tokens
    adapter.py       the LoRA adapter alone, in llama.cpp's adapter GGUF format, with a FROM/ADAPTER Modelfile
    verify.py        --verify: the file read back by transformers and compared with the merged folder

Imports go one way: model_config and dependency are below both writers, tensors below export and adapter, and
export reaches adapter only for --adapter. The storage type of each tensor for a file type (q4_k_m, ...), as
llama.cpp's llama-quantize chooses it, is plan/gguf_mixture.py: the size advice reads it too.

The GGUF file *as a base model* for training is another job: qlora_kit/model/gguf_base.py.
"""
