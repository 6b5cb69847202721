"""What every worker role shares, and how the router creates workers without torch.

- config.py          WorkerConfig (one worker actor), ROLES, KV_BACKENDS, ray_resources
- worker_base.py     WorkerBase: the engine on its own thread, ping, stats, pool_state
- token_stream.py    TokenStream: engine-thread events -> the actor's event loop
- streaming_worker.py  StreamingWorker: the token stream and abort of decode/colocated
- token_channel.py   the token stream's own TCP connection, worker -> router
- actors.py          the Ray actor class per role: the remote API in one file; the real
                     worker (torch, the model) is imported inside the actor process

The roles sit on top (prefill_worker/, decode_worker/, colocated_worker/) and never
import each other.
"""
