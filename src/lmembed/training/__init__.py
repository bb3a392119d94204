"""The training flow: language models tied or untied (lm), translation models with decoder or
three-way tying (seq2seq), and downstream fine-tuning of (compressed) encoders (finetune), over
one step loop and one epoch loop (loop), data parallel under torchrun (dist), in run
directories that resume exactly (runs). The API verbs are re-exported by the lmembed package."""
