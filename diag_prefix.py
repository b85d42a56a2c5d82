import sys, os, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, "benchmarks"); sys.argv = ["x"]
os.environ["HF_HUB_OFFLINE"] = "1"
import gpu_check as g
import lightning as L
from lightning_peft import inject, adapter_state_dict
tokens = torch.randint(0, g.VOCAB, (8, g.SEQ), generator=torch.Generator().manual_seed(1))
def loss(model, device, mode="fp32", impl=None):
    if impl: model.config._attn_implementation = impl
    model = model.to(device); t = tokens.to(device)
    with torch.no_grad():
        if mode == "autocast":
            with torch.autocast(device, dtype=torch.bfloat16):
                return round(model(input_ids=t, labels=t).loss.item(), 4)
        if mode == "bf16":
            model = model.to(torch.bfloat16)
        return round(model(input_ids=t, labels=t).loss.item(), 4)
for name, make in [("base", None), ("lora", g.lora), ("prefix", g.prefix), ("prompt", g.prompt)]:
    row = []
    for device, mode, impl in [("cpu", "fp32", None), ("cuda", "fp32", None), ("cuda", "fp32", "eager"), ("cuda", "autocast", None), ("cuda", "bf16", None)]:
        model = g.llama() if make is None else inject(g.llama(), make())
        row.append(f"{device}/{mode}/{impl or 'sdpa'} {loss(model, device, mode, impl)}")
    print(name, " | ".join(row), flush=True)
# losses through Lightning: plain and FSDP, prefix
class Record(g.LM):
    pass
for strategy in ["auto", "fsdp"]:
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from lightning_peft import fsdp_auto_wrap_policy
    st = "auto" if strategy == "auto" else FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(LlamaDecoderLayer))
    for precision in ["32-true", "bf16-mixed"]:
        m, _, _ = g.fit(g.prefix(), strategy=st, precision=precision)
        print("fit prefix", strategy, precision, [round(x, 4) for x in m.losses], flush=True)
        st = "auto" if strategy == "auto" else FSDPStrategy(auto_wrap_policy=fsdp_auto_wrap_policy(LlamaDecoderLayer))
