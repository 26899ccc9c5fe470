"""The openai-client example of docs/serve.md and the README, run by recipes/serve.sh against `mlpmem serve`."""
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
r = client.completions.create(model="memory", prompt="The capital of France is", max_tokens=12, temperature=0)
print(repr(r.choices[0].text), r.usage.completion_tokens, r.model_extra["mlpmemory"])
r = client.completions.create(model="memory", prompt="The capital of France is", max_tokens=12, temperature=0,
                              extra_body={"lam": 0.0})  # lambda 0: the base model's own output
print(repr(r.choices[0].text))
stream = client.chat.completions.create(model="mlpmemory", messages=[{"role": "user", "content": "Who wrote Hamlet?"}],
                                        max_tokens=16, temperature=0, stream=True)
print("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
stream = client.chat.completions.create(model="knn_lm", messages=[{"role": "user", "content": "Who wrote Hamlet?"}],
                                        max_tokens=8, temperature=0, stream=True, extra_body={"lam": 0.15})
print("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
