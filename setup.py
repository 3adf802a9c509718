"""Package discovery that pyproject.toml alone cannot express: migrations/ is installed as bot.migrations.

Everything else about the package is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["bot", "bot.*"]),
        *(f"bot.{name}" for name in find_packages(include=["migrations", "migrations.*"])),
    ]
)
