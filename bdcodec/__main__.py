from .cli import run

if __name__ == "__main__":  # not when a worker process (-j N, 'spawn') imports it as __mp_main__
    run()
