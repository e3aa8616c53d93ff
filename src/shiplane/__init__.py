"""shiplane: ship Python web applications from a checkout to servers, stage by stage."""

__version__ = "0.1.0"
