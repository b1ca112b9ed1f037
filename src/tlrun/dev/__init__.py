"""What tlrun dev adds: reload, the in-process debug worker, a private broker, IDE run configurations."""
