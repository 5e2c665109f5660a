"""The engine's core: context, registry, workflow/step/transaction execution, queues, scheduler."""
