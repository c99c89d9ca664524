# GPT-2 (124M) trained from scratch on FineWeb-Edu's 10-billion-token sample, on one node of 8 GPUs, with the
# settings of build-nanogpt (which reports HellaSwag beside OpenAI's GPT-2 (124M), acc_norm 0.2955). The corpus
# comes as JSON Lines (README, "Bigger data", fetches it), then:
#
#   python prepare.py --input=fineweb-edu-10BT.jsonl --tokenizer=gpt2 --data_dir=data/fineweb-edu --val_fraction=0.002
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
#   python look.py hellaswag --init_from=out-gpt2-124m/best.pt
#
# nanoGPT's OpenWebText run (val loss about 2.85 after 600,000 steps) differs in the batch and the schedule:
#   --data_dir=data/openwebtext --batch_size=12 --gradient_accumulation_steps=40 --max_iters=600000
#   --lr_decay_iters=600000 --warmup_iters=2000 --eval_interval=1000 --eval_iters=200
data_dir = "data/fineweb-edu"
out_dir = "out-gpt2-124m"

# GPT-2 (124M), as OpenAI built it: learned positions, GELU, LayerNorm, biases, a tied head, AdamW
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
rope = False
zero_init = False
muon = False

# 64 x 1024 tokens per GPU and micro-step, 8 micro-steps over the 8 GPUs: 524,288 tokens a step; 19,073 steps
# are the 10B tokens once
batch_size = 64
gradient_accumulation_steps = 8
max_iters = 19073
lr_decay_iters = 19073
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 715
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# evaluation: 160 x 64 windows of 1024 tokens (10M tokens) every 250 steps, shared by the 8 GPUs
eval_interval = 250
eval_iters = 160
log_interval = 10
sample_length = 200
dtype = "bfloat16"
compile = True
