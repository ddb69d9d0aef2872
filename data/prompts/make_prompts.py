"""Generate data/prompts/train.jsonl: diverse drafter-training prompts from templates.

    python data/prompts/make_prompts.py [--out data/prompts/train.jsonl] [--seed 0]

Categories: how-to instructions, questions and explanations, code, creative and practical
writing, maths word problems, chit-chat, translation, formatting, rewriting and summarising,
classification and extraction, brainstorming, and multi-turn conversations (`messages`, some
with a system prompt). Deterministic for a seed. Any prompt whose text also appears in
eval.jsonl (next to this script) is dropped, so the evaluation set stays unseen.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---- vocabularies ------------------------------------------------------------------------------
HOWTO_TASKS = [
    "boil an egg", "change a flat bicycle tyre", "make a cup of green tea", "start a vegetable garden",
    "clean a cast iron pan", "write a cover letter", "prepare for a job interview", "learn to juggle",
    "fold a fitted sheet", "remove a coffee stain from a shirt", "set up a monthly budget",
    "train a puppy to sit", "make sourdough starter", "tie a tie", "back up my phone",
    "improve my handwriting", "memorise a short speech", "organise a small closet", "brew cold coffee",
    "plan a weekend hiking trip", "paint a room", "make a paper airplane", "care for a cactus",
    "reduce screen time", "study for a history exam", "stay focused while working from home",
    "make homemade pizza dough", "choose a good watermelon", "keep basil alive indoors",
    "write a thank-you note", "negotiate a higher salary", "start running as a beginner",
    "set up a fish tank", "sharpen a kitchen knife", "unclog a bathroom sink",
    "make friends in a new city", "learn a new language on my own", "meditate for ten minutes",
    "pack a suitcase efficiently", "make a simple budget spreadsheet", "teach a child to ride a bike",
    "bake chocolate chip cookies", "build a birdhouse", "write a haiku", "take better phone photos",
    "save money on groceries", "fall asleep faster", "get rid of fruit flies", "make a smoothie",
    "recover from jet lag", "host a board game night", "cook rice without a rice cooker",
]
HOWTO_FORMS = [
    "How do I {t}?", "Give me step-by-step instructions to {t}.", "What's the best way to {t}?",
    "Can you explain how to {t}?", "I want to {t}. Where should I start?",
    "Write a short guide on how to {t}.", "What are the most common mistakes people make when they {t}?",
    "Explain to a beginner how to {t} in five steps.",
]
CONCEPTS = [
    "photosynthesis", "inflation", "gravity", "the water cycle", "compound interest", "machine learning",
    "a black hole", "the immune system", "supply and demand", "democracy", "plate tectonics",
    "DNA", "the greenhouse effect", "blockchain", "a neural network", "evolution by natural selection",
    "the stock market", "vaccines", "electricity", "the internet", "climate change", "recursion",
    "an API", "a recession", "the Pythagorean theorem", "entropy", "the placebo effect",
    "cloud computing", "probability", "a bond in finance", "the French Revolution", "renewable energy",
    "the speed of light", "a prime number", "an ecosystem", "encryption", "the Roman Empire",
    "a volcano", "the moon's phases", "antibiotics", "a credit score", "opportunity cost",
    "the Renaissance", "tides", "a hash table", "big O notation", "the scientific method",
    "a carbon footprint", "jet engines", "caffeine", "the circulatory system", "magnetism",
    "the printing press", "a budget deficit", "version control", "the theory of relativity",
    "an operating system", "a cell membrane", "sound waves", "the Silk Road",
]
CONCEPT_FORMS = [
    "Explain {c} in simple terms.", "What is {c}?", "Can you explain {c} to a ten-year-old?",
    "Give me a short overview of {c}.", "Why is {c} important?", "Describe {c} in three sentences.",
    "What are the key ideas behind {c}?", "Explain {c} using an everyday analogy.",
]
COMPARISONS = [
    ("a virus", "a bacterium"), ("weather", "climate"), ("a list", "a tuple in Python"),
    ("stocks", "bonds"), ("RAM", "storage"), ("a crocodile", "an alligator"), ("speed", "velocity"),
    ("HTTP", "HTTPS"), ("baking soda", "baking powder"), ("a simile", "a metaphor"),
    ("an asteroid", "a comet"), ("TCP", "UDP"), ("empathy", "sympathy"), ("a lake", "a pond"),
    ("mitosis", "meiosis"), ("a CPU", "a GPU"), ("debit cards", "credit cards"),
    ("a republic", "a monarchy"), ("affect", "effect"), ("SQL", "NoSQL databases"),
    ("a hurricane", "a tornado"), ("renting", "buying a home"), ("tea", "coffee"),
    ("a compiler", "an interpreter"), ("latitude", "longitude"), ("frogs", "toads"),
]
COMPARE_FORMS = [
    "What is the difference between {a} and {b}?", "Compare {a} and {b}.",
    "How do {a} and {b} differ?", "{A} vs {b}: which should I choose and why?",
]
WHY_QUESTIONS = [
    "Why is the sky blue?", "Why do cats purr?", "Why do leaves change colour in autumn?",
    "Why does ice float on water?", "Why do we dream?", "Why is the ocean salty?",
    "Why do onions make you cry?", "Why do we have time zones?", "Why do birds migrate?",
    "Why does bread go stale?", "Why do we yawn?", "Why is exercise good for the brain?",
    "Why do airplanes leave white trails?", "Why do stars twinkle?", "Why does metal feel cold?",
    "Why do we get hiccups?", "Why is Mars red?", "Why do some people need glasses?",
    "Why do bubbles pop?", "Why do dogs wag their tails?", "Why do we need sleep?",
    "Why is the Dead Sea called dead?", "Why do roosters crow in the morning?",
    "Why do we have leap years?", "Why is gold valuable?", "Why do bananas turn brown?",
    "Why can't we see air?", "Why do some fruits have seeds inside?", "Why do ears pop on a plane?",
    "Why are flamingos pink?", "Why does the moon look bigger near the horizon?",
]
FACT_QUESTIONS = [
    "What is the capital of Australia?", "How many bones are in the human body?",
    "Who painted the Mona Lisa?", "How far is the Moon from Earth?", "What is the tallest mountain in Africa?",
    "How many continents are there?", "Who wrote 'Pride and Prejudice'?", "What is the boiling point of water in Fahrenheit?",
    "What language is spoken in Brazil?", "How long does it take light from the Sun to reach Earth?",
    "What is the largest planet in our solar system?", "When did the first person walk on the Moon?",
    "What is the chemical symbol for gold?", "How many players are on a football team?",
    "What is the longest river in the world?", "Who invented the telephone?",
    "What is the smallest country in the world?", "How many hearts does an octopus have?",
    "What is the freezing point of water in Celsius?", "Which planet is known as the red planet?",
    "What is the main ingredient of guacamole?", "How many strings does a violin have?",
    "What year did the Berlin Wall fall?", "What is the hardest natural substance?",
    "Which ocean is the largest?", "Who discovered penicillin?", "What does a barometer measure?",
]

LANGS = ["Python", "JavaScript", "Java", "C", "C++", "Go", "Rust", "TypeScript", "Ruby", "Bash"]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a string", "finds the largest element of a list",
    "removes duplicates from a list while keeping order", "checks whether a string is a palindrome",
    "converts Celsius to Fahrenheit", "merges two sorted lists", "computes the factorial of n",
    "flattens a nested list", "counts how often each word appears in a text",
    "returns the second largest number in a list", "validates an email address with a simple rule",
    "sums the digits of an integer", "finds the greatest common divisor of two numbers",
    "capitalises the first letter of every word", "rotates a list by k positions",
    "checks whether two strings are anagrams", "implements binary search",
    "reads a file and prints the number of lines", "converts a binary string to an integer",
    "generates all subsets of a small list", "computes the average of a list of numbers",
    "finds the longest word in a sentence", "implements a stack with push and pop",
    "transposes a matrix", "checks whether a year is a leap year", "returns the median of a list",
    "replaces every space in a string with an underscore",
]
CODE_FORMS = [
    "Write a {lang} function that {task}.", "In {lang}, how would I write code that {task}?",
    "Show me a short {lang} snippet that {task}, with a comment on each line.",
    "Write a {lang} function that {task}, and include two example calls.",
]
SNIPPETS = [
    ("Python", "def f(xs):\n    return [x * x for x in xs if x % 2 == 0]"),
    ("Python", "total = 0\nfor i in range(1, 11):\n    total += i\nprint(total)"),
    ("Python", "def g(s):\n    return s == s[::-1]"),
    ("Python", "with open('data.txt') as f:\n    lines = [l.strip() for l in f if l.strip()]"),
    ("Python", "import collections\ncounts = collections.Counter(words)\nprint(counts.most_common(3))"),
    ("JavaScript", "const doubled = [1, 2, 3].map(n => n * 2);\nconsole.log(doubled);"),
    ("JavaScript", "function debounce(fn, ms) {\n  let t;\n  return (...args) => {\n    clearTimeout(t);\n    t = setTimeout(() => fn(...args), ms);\n  };\n}"),
    ("JavaScript", "const user = { name: 'Ana', age: 31 };\nconst { name, ...rest } = user;"),
    ("C", "int sum(int *a, int n) {\n    int s = 0;\n    for (int i = 0; i < n; i++) s += a[i];\n    return s;\n}"),
    ("Bash", "for f in *.txt; do\n  wc -l \"$f\"\ndone"),
    ("SQL", "SELECT country, COUNT(*) AS n\nFROM customers\nGROUP BY country\nORDER BY n DESC;"),
    ("Go", "func max(a, b int) int {\n\tif a > b {\n\t\treturn a\n\t}\n\treturn b\n}"),
    ("Rust", "fn main() {\n    let v: Vec<i32> = (1..=5).collect();\n    println!(\"{:?}\", v);\n}"),
]
BUGGY = [
    ("Python", "def average(xs):\n    return sum(xs) / len(xs) + 1"),
    ("Python", "def last(xs):\n    return xs[len(xs)]"),
    ("Python", "for i in range(10)\n    print(i)"),
    ("JavaScript", "function isEven(n) {\n  return n % 2 = 0;\n}"),
    ("Python", "def count_a(s):\n    n = 0\n    for ch in s:\n        if ch == 'a':\n            n =+ 1\n    return n"),
    ("C", "int main() {\n    int x = 5\n    printf(\"%d\", x);\n}"),
    ("Python", "names = ['a', 'b']\nprint(names.length)"),
]
SQL_TASKS = [
    "returns the ten most recent orders", "finds customers who have never placed an order",
    "computes the total sales per month", "lists employees earning more than their manager",
    "counts the products in each category", "finds duplicate email addresses in a users table",
    "returns the average rating per movie, highest first", "deletes rows older than one year",
]
CODE_QUESTIONS = [
    "What is the difference between == and is in Python?", "How do I read a CSV file in Python?",
    "What does 'git rebase' do?", "How do I undo the last git commit?", "What is a race condition?",
    "How do I make an HTTP request in JavaScript?", "What is a Python decorator?",
    "What is the difference between a process and a thread?", "How do I sort a dictionary by value in Python?",
    "What is dependency injection?", "How do I create a virtual environment in Python?",
    "What does 'async/await' mean in JavaScript?", "Explain what a REST API is.",
    "How do I reverse a linked list?", "What is the difference between let, const and var?",
    "How can I find which process is using a port on Linux?", "What is a segmentation fault?",
    "When should I use a set instead of a list?", "How do I write a unit test in Python?",
    "What is memoization?",
]

WRITING_FORMS = [
    "Write a short poem about {t}.", "Write a haiku about {t}.", "Write a limerick about {t}.",
    "Write a very short story (under 150 words) about {t}.", "Write the opening paragraph of a novel about {t}.",
    "Write a tweet about {t}.", "Write a product description for {p}.", "Write a catchy slogan for {p}.",
    "Write a short blog post introduction about {t}.", "Describe {t} as if you were a pirate.",
    "Write a diary entry from the point of view of {c}.", "Write a dialogue between {c} and a robot.",
    "Write a bedtime story about {c}.", "Write a short speech for {e}.", "Write a toast for {e}.",
]
WRITING_TOPICS = [
    "the ocean at night", "autumn leaves", "a lost umbrella", "the first day of school", "city lights",
    "a cup of coffee", "an old lighthouse", "friendship", "a rainy Monday", "the mountains",
    "a forgotten library", "snow falling", "a train journey", "the last day of summer", "a garden",
    "a thunderstorm", "time", "a small village", "the moon", "learning to swim", "a busy market",
    "a quiet forest", "a kite", "an empty playground", "stars over the desert",
]
PRODUCTS = [
    "a reusable water bottle", "noise-cancelling headphones", "a smart alarm clock", "a bamboo toothbrush",
    "an electric bike", "a handmade candle", "a travel backpack", "a solar phone charger",
    "a language learning app", "an ergonomic office chair", "organic honey", "a board game for families",
]
CHARACTERS = [
    "a curious cat", "a retired astronaut", "a tiny dragon", "a lighthouse keeper", "a talking tree",
    "a nervous chef", "a brave mouse", "a time traveller", "a lonely robot", "a young wizard",
]
EVENTS = [
    "a wedding", "a retirement party", "a school graduation", "a team that just won a championship",
    "a friend's 30th birthday", "the opening of a new library", "a farewell dinner for a colleague",
]
EMAILS = [
    ("my landlord", "a broken heater"), ("my manager", "taking next Friday off"),
    ("a customer", "a delayed delivery"), ("my team", "the new meeting schedule"),
    ("a professor", "an extension for an assignment"), ("a neighbour", "a noisy party planned for Saturday"),
    ("a hotel", "a booking change"), ("a recruiter", "declining a job offer politely"),
    ("a client", "a project update"), ("a friend", "catching up after a long time"),
    ("the city council", "a broken streetlight"), ("a supplier", "a wrong invoice"),
]
EMAIL_FORMS = [
    "Write an email to {r} about {s}.", "Draft a polite email to {r} about {s}.",
    "Write a short, friendly message to {r} about {s}.",
]

ITEMS = ["pencils", "apples", "notebooks", "tickets", "cupcakes", "bottles of juice", "stamps", "plants"]
NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Luis",
         "Maya", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]

CHITCHAT = [
    "Hi! How are you today?", "Good morning!", "Hello there, what can you do?", "Tell me a joke.",
    "Tell me something interesting.", "What's a fun fact about octopuses?", "I'm bored. Any ideas?",
    "Can you recommend a good book?", "What should I cook for dinner tonight?", "I had a long day at work.",
    "Do you like music?", "What's your favourite season and why?", "Say something nice to cheer me up.",
    "I just finished my exams!", "I can't decide what to watch tonight.", "Tell me a riddle.",
    "What would you do with a free afternoon?", "I'm learning to play the guitar.", "Thanks for your help!",
    "What's a good name for a goldfish?", "Can you tell me a tongue twister?", "I adopted a kitten today!",
    "Give me a motivational quote.", "Let's play a word game.", "What is your favourite animal?",
    "I'm nervous about a presentation tomorrow.", "Good night!", "Any tips for a rainy weekend?",
]
JOKE_TOPICS = ["dogs", "computers", "vegetables", "the weather", "math", "teachers", "space", "coffee",
               "penguins", "doctors", "trains", "pizza"]
FEELINGS = ["tired", "excited", "stressed", "happy", "a bit lonely", "anxious", "proud", "unmotivated"]
RECS = [("movie", "a cosy night in"), ("book", "a long flight"), ("podcast", "my commute"),
        ("board game", "four friends"), ("song", "a road trip"), ("hobby", "someone who likes being outdoors"),
        ("recipe", "a quick lunch"), ("exercise", "a rainy day indoors")]

TRANSLATION_LANGS = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Japanese", "Chinese"]
SENTENCES = [
    "Where is the train station?", "I would like a cup of coffee, please.", "The weather is lovely today.",
    "How much does this cost?", "My name is Sarah and I am a teacher.", "Can you help me, please?",
    "I have been learning this language for two years.", "The museum opens at nine in the morning.",
    "We are going to the beach tomorrow.", "Thank you very much for dinner.", "Where is the nearest pharmacy?",
    "I don't understand.", "What time is it?", "The book is on the table.", "I love reading in the evening.",
    "Could you speak more slowly?", "My brother lives in London.", "This soup is delicious.",
    "Happy birthday!", "See you next week.", "I am looking for a hotel near the centre.",
    "Please close the window.", "It is raining again.", "Do you have a vegetarian menu?",
]
TRANSLATE_FORMS = [
    "Translate into {lang}: \"{s}\"", "How do you say \"{s}\" in {lang}?",
    "Translate this sentence to {lang} and explain any tricky words: {s}",
]
FOREIGN = [
    ("French", "Je voudrais réserver une table pour deux personnes."), ("Spanish", "¿Dónde está la biblioteca?"),
    ("German", "Ich habe heute keine Zeit."), ("Italian", "Il treno è in ritardo di dieci minuti."),
    ("Portuguese", "Eu gosto muito de música brasileira."), ("Spanish", "Mañana vamos al mercado."),
    ("French", "Il fait très froid ce matin."), ("German", "Wie spät ist es?"),
]

FMT_DATA = [
    "name: Alice, age: 30, city: Paris; name: Bob, age: 25, city: Rome; name: Cara, age: 41, city: Oslo",
    "apples 3 kg 2.50; bananas 2 kg 1.20; cherries 1 kg 6.00",
    "Monday - gym; Tuesday - piano lesson; Wednesday - rest; Thursday - gym; Friday - movie night",
    "title=Dune, author=Frank Herbert, year=1965; title=Emma, author=Jane Austen, year=1815",
    "server1 up 99.9%; server2 down 0%; server3 up 97.5%",
    "red #ff0000, green #00ff00, blue #0000ff, black #000000",
]
FMT_FORMS = [
    "Convert this into a markdown table: {d}", "Format this data as JSON: {d}", "Turn this into a CSV with a header row: {d}",
    "Rewrite this as a bulleted list: {d}", "Convert this to YAML: {d}",
]
NOTES = [
    "meeting moved to 3pm, bring laptop, Sara presents budget, questions after",
    "buy milk eggs bread, call mum, pay electricity bill, book dentist",
    "project due friday, tests failing on login page, need design review, deploy monday",
    "trip: passport, charger, sunscreen, tickets printed, hotel confirmation",
]
WORD_LISTS = [
    "banana, apple, cherry, mango, kiwi", "zebra, lion, elephant, antelope, giraffe",
    "Tokyo, Cairo, Lima, Berlin, Auckland", "violin, drum, flute, piano, cello",
]

PARAGRAPHS = [
    "The city council met on Tuesday to discuss the new bicycle lanes. Residents were divided: some "
    "welcomed safer routes for cyclists, while shop owners worried about losing parking spaces. The "
    "council agreed to run a six-month trial before making a final decision.",
    "Honeybees communicate the location of food through a 'waggle dance'. The angle of the dance "
    "shows the direction relative to the sun, and its length indicates the distance. Other bees "
    "watch the dance and then fly straight to the flowers.",
    "Remote work has grown quickly in the last few years. Many employees enjoy the flexibility and "
    "the lack of a commute, but some miss the social contact of an office. Companies are now "
    "experimenting with hybrid schedules.",
    "The Great Wall of China was built over many centuries by different dynasties. It was meant to "
    "protect against invasions from the north. Today it is one of the most visited monuments in "
    "the world.",
    "Sleep plays an important role in memory. During deep sleep, the brain replays and strengthens "
    "what was learned during the day. People who sleep poorly often find it harder to concentrate.",
]
SENTENCES_TO_FIX = [
    "me and him goes to the store yesterday", "their going to be late because there car broke",
    "i has three cat and they is very cute", "the informations you gave me was very usefull",
    "she dont like vegetables but she eat them anyway", "we was happy to seen you at the party",
]
INFORMAL = [
    "hey, can u send me the report asap?", "sorry i'm late, traffic was crazy",
    "gonna need more time on this one", "thx for the help yesterday, u saved me",
    "the new app is kinda buggy tbh", "can't make it to the meeting, something came up",
]
REVIEWS = [
    "The food was cold and the waiter ignored us for twenty minutes.",
    "Absolutely loved this phone, the battery lasts for days!", "It's okay, nothing special but it works.",
    "Worst customer service I have ever experienced.", "The hotel room was spotless and the view was amazing.",
    "The movie started slow but the ending was brilliant.", "Shipping took forever and the box was damaged.",
    "Great value for money, I would buy it again.",
]
EXTRACT = [
    "Extract all the dates from this text: The contract starts on 3 March 2024, the first review is "
    "on 15 June 2024 and it ends on 31 December 2025.",
    "Extract the names of people mentioned: Yesterday Maria met Tom at the café, and later they "
    "called Dr. Patel about the results.",
    "List every number in this sentence: We ordered 12 pizzas, 3 salads and 48 cans of soda for 35 people.",
    "Find the email addresses in this text: contact sales@example.com or support@example.org for help.",
    "Which cities are mentioned here? We flew from Madrid to Toronto, then took a train to Montreal.",
]
BRAINSTORM = [
    ("ideas for a birthday party for a 7-year-old", 5), ("names for a coffee shop", 10),
    ("ways to reduce plastic waste at home", 7), ("topics for a school science fair", 6),
    ("healthy breakfast ideas", 5), ("things to do in a small town on a Sunday", 8),
    ("questions to ask in a job interview", 5), ("team-building activities for remote workers", 6),
    ("gift ideas for someone who loves cooking", 5), ("ways to learn vocabulary faster", 6),
    ("fun facts about the ocean", 5), ("side dishes for a barbecue", 7),
    ("ideas for a short film", 3), ("low-cost date ideas", 6), ("ways to save energy at home", 8),
    ("names for a fantasy kingdom", 10), ("classic novels everyone should read", 5),
    ("uses for an old jar", 6), ("tips for a first marathon", 5), ("hobbies you can start with no money", 7),
]
LIST_FORMS = ["Give me {n} {x}.", "List {n} {x}.", "Brainstorm {n} {x}.", "Can you suggest {n} {x}?"]

SYSTEMS = [
    "You are a helpful assistant.", "You are a friendly tutor who explains things simply.",
    "You are a concise assistant. Keep answers short.", "You are a patient cooking teacher.",
    "You are an expert Python programmer.", "You are a travel guide.", "You answer like a cheerful pirate.",
    "You are a careful proofreader.",
]
CONVERSATIONS = [
    [("user", "I want to start exercising but I don't know where to begin."),
     ("assistant", "A good start is 20-30 minutes of walking three times a week, then adding light strength work."),
     ("user", "What kind of strength exercises can I do at home?")],
    [("user", "Can you help me plan a trip to Italy?"),
     ("assistant", "Of course! How many days do you have, and do you prefer cities, food or nature?"),
     ("user", "Ten days, and I love food and old towns.")],
    [("user", "What is a good name for a grey cat?"), ("assistant", "How about Smokey, Ash or Pebble?"),
     ("user", "Those are nice. Can you give me some more unusual ones?")],
    [("user", "Write a Python function that adds two numbers."),
     ("assistant", "def add(a, b):\n    return a + b"), ("user", "Now make it work for any number of arguments.")],
    [("user", "What's the capital of Canada?"), ("assistant", "The capital of Canada is Ottawa."),
     ("user", "Why not Toronto? It's bigger.")],
    [("user", "I'm making pancakes. What do I need?"),
     ("assistant", "Flour, milk, eggs, a little sugar, baking powder, salt and butter for the pan."),
     ("user", "I have no eggs. What can I use instead?")],
    [("user", "Explain what an API is."),
     ("assistant", "An API is a set of rules that lets one program ask another program for data or actions."),
     ("user", "Can you give me a real-world example?")],
    [("user", "Translate 'thank you' into Spanish."), ("assistant", "'Thank you' in Spanish is 'gracias'."),
     ("user", "And how do I say 'thank you very much'?")],
    [("user", "I have a job interview tomorrow."), ("assistant", "Good luck! What is the role?"),
     ("user", "It's a junior data analyst position. What should I prepare?")],
    [("user", "What's 15% of 80?"), ("assistant", "15% of 80 is 12."), ("user", "And what is 80 plus 15%?")],
    [("user", "Summarise the story of Cinderella in one sentence."),
     ("assistant", "A kind young woman mistreated by her stepfamily attends a royal ball with a fairy godmother's help and wins the prince's heart."),
     ("user", "Now tell it from the stepmother's point of view.")],
    [("user", "My tomato plants have yellow leaves."),
     ("assistant", "Yellow leaves often mean overwatering or a lack of nitrogen. How often do you water them?"),
     ("user", "Every day, quite a lot.")],
    [("user", "Recommend a science fiction book."), ("assistant", "Try 'The Left Hand of Darkness' by Ursula K. Le Guin."),
     ("user", "I'd prefer something lighter and funny.")],
    [("user", "How do I convert a list to a string in Python?"),
     ("assistant", "Use ''.join(items) if the items are strings, or ''.join(map(str, items)) otherwise."),
     ("user", "How do I put commas between the items?")],
    [("user", "Write a haiku about winter."),
     ("assistant", "Silent falling snow\nthe old pine bows its white head\nfootprints fade to dusk"),
     ("user", "Now write one about summer.")],
    [("user", "I feel stressed about my exams."),
     ("assistant", "That's understandable. Breaking revision into small blocks with breaks can help. Which subject worries you most?"),
     ("user", "Chemistry. I keep forgetting the formulas.")],
]
FOLLOW_UPS = [
    "Can you make that shorter?", "Can you explain that in more detail?", "Give me an example.",
    "Can you put that in a bulleted list?", "Thanks! What else should I know?", "Can you say that more simply?",
]
SINGLE_FOR_FOLLOW_UP = [
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and oxygen."),
    ("How do vaccines work?", "Vaccines train the immune system to recognise a germ without causing the disease."),
    ("What is a budget?", "A budget is a plan for how you will spend and save your money over a period of time."),
    ("What does a database index do?", "An index lets the database find rows quickly without scanning the whole table."),
    ("Why do we have seasons?", "Seasons happen because Earth's axis is tilted, so each hemisphere gets more or less direct sunlight during the year."),
    ("What is inflation?", "Inflation is the general rise in prices over time, which lowers what money can buy."),
    ("How do I boil pasta?", "Bring salted water to a boil, add the pasta, stir, and cook for the time on the packet."),
    ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
]


# ---- generators --------------------------------------------------------------------------------
def maths(rng: random.Random) -> str:
    kind = rng.randrange(12)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    name = rng.choice(NAMES)
    if kind == 0:
        return f"What is {a * rng.randint(2, 30)} divided by {a}?"
    if kind == 1:
        return f"{name} buys {rng.randint(2, 12)} {rng.choice(ITEMS)} at ${rng.randint(1, 9)}.{rng.choice(['00', '25', '50', '75'])} each. How much does {name} pay in total?"
    if kind == 2:
        return f"What is {rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75])}% of {rng.randint(2, 60) * 10}?"
    if kind == 3:
        x = rng.randint(-9, 12)
        c = a * x + b
        return f"Solve for x: {a}x + {b} = {c}"
    if kind == 4:
        return f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?"
    if kind == 5:
        speed, hours = rng.randint(30, 120), rng.randint(2, 8)
        return f"A car travels at {speed} km/h for {hours} hours. How far does it go?"
    if kind == 6:
        nums = [rng.randint(1, 100) for _ in range(rng.randint(4, 7))]
        return f"What is the average of {', '.join(map(str, nums))}?"
    if kind == 7:
        return f"Is {rng.choice([2, 3, 5, 7, 11, 13]) * rng.randint(1, 40) + rng.choice([0, 1])} a prime number? Explain."
    if kind == 8:
        r = rng.randint(1, 20)
        return f"What is the area of a circle with radius {r} m?"
    if kind == 9:
        p, rate, yrs = rng.randint(1, 20) * 500, rng.choice([2, 3, 4, 5, 6]), rng.randint(2, 10)
        return f"If I invest ${p} at {rate}% simple interest per year, how much interest do I earn after {yrs} years?"
    if kind == 10:
        return f"Convert {rng.randint(1, 50)} {rng.choice(['miles to kilometres', 'kilograms to pounds', 'litres to gallons', 'feet to metres', 'hours to minutes'])}."
    n1, d1, n2, d2 = rng.randint(1, 9), rng.randint(2, 10), rng.randint(1, 9), rng.randint(2, 10)
    return f"What is {n1}/{d1} + {n2}/{d2}? Simplify the result."


def single_turn(rng: random.Random) -> list[str]:
    """Every template expansion of the single-turn categories (some sampled)."""
    out: list[str] = []
    for t in HOWTO_TASKS:
        out += [f.format(t=t) for f in rng.sample(HOWTO_FORMS, 3)]
    for c in CONCEPTS:
        out += [f.format(c=c) for f in rng.sample(CONCEPT_FORMS, 3)]
    for a, b in COMPARISONS:
        f = rng.choice(COMPARE_FORMS)
        out.append(f.format(a=a, b=b, A=a[0].upper() + a[1:]))
    out += WHY_QUESTIONS + FACT_QUESTIONS + CODE_QUESTIONS
    for task in CODE_TASKS:
        for lang in rng.sample(LANGS, 4):
            out.append(rng.choice(CODE_FORMS).format(lang=lang, task=task))
    for lang, code in SNIPPETS:
        out.append(f"Explain what this {lang} code does:\n```\n{code}\n```")
        out.append(f"How could this {lang} code be improved?\n```\n{code}\n```")
    for lang, code in BUGGY:
        out.append(f"Find and fix the bug in this {lang} code:\n```\n{code}\n```")
    for task in SQL_TASKS:
        out.append(f"Write a SQL query that {task}.")
    for form in WRITING_FORMS:
        for _ in range(8):
            out.append(form.format(t=rng.choice(WRITING_TOPICS), p=rng.choice(PRODUCTS),
                                   c=rng.choice(CHARACTERS), e=rng.choice(EVENTS)))
    for r, s in EMAILS:
        out += [f.format(r=r, s=s) for f in rng.sample(EMAIL_FORMS, 2)]
    out += [maths(rng) for _ in range(280)]
    out += CHITCHAT
    out += [f"Tell me a joke about {t}." for t in JOKE_TOPICS]
    out += [f"I'm feeling {f} today." for f in FEELINGS]
    out += [f"Can you recommend a {m} for {o}?" for m, o in RECS]
    for s in SENTENCES:
        for lang in rng.sample(TRANSLATION_LANGS, 3):
            out.append(rng.choice(TRANSLATE_FORMS).format(lang=lang, s=s))
    for lang, s in FOREIGN:
        out.append(f"Translate this {lang} sentence into English: \"{s}\"")
        out.append(f"What does \"{s}\" mean?")
    for d in FMT_DATA:
        out += [f.format(d=d) for f in rng.sample(FMT_FORMS, 3)]
    for n in NOTES:
        out.append(f"Turn these notes into a tidy bulleted list: {n}")
        out.append(f"Write these notes up as a short, clear paragraph: {n}")
    for w in WORD_LISTS:
        out.append(f"Sort these alphabetically: {w}")
        out.append(f"Put these into a numbered list and add one fact about each: {w}")
    for p in PARAGRAPHS:
        out.append(f"Summarise this in one sentence:\n\n{p}")
        out.append(f"Give me three bullet-point takeaways from this text:\n\n{p}")
        out.append(f"Write a title for this paragraph:\n\n{p}")
    for s in SENTENCES_TO_FIX:
        out.append(f"Correct the grammar in this sentence: \"{s}\"")
    for s in INFORMAL:
        out.append(f"Rewrite this message so it sounds professional: \"{s}\"")
    for r in REVIEWS:
        out.append(f"Is this review positive, negative or neutral? \"{r}\"")
        out.append(f"Write a polite reply from the business to this review: \"{r}\"")
    out += EXTRACT
    for x, n in BRAINSTORM:
        out.append(rng.choice(LIST_FORMS).format(n=n, x=x))
    return out


def multi_turn(rng: random.Random) -> list[list[dict]]:
    convs: list[list[dict]] = []
    for turns in CONVERSATIONS:
        msgs = [{"role": r, "content": c} for r, c in turns]
        convs.append(msgs)
        convs.append([{"role": "system", "content": rng.choice(SYSTEMS)}] + msgs)
    for q, a in SINGLE_FOR_FOLLOW_UP:
        for follow in rng.sample(FOLLOW_UPS, 3):
            convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a},
                          {"role": "user", "content": follow}])
    for c in rng.sample(CONCEPTS, 20):  # system prompt + a single question
        convs.append([{"role": "system", "content": rng.choice(SYSTEMS)},
                      {"role": "user", "content": rng.choice(CONCEPT_FORMS).format(c=c)}])
    for t in rng.sample(HOWTO_TASKS, 16):
        convs.append([{"role": "system", "content": rng.choice(SYSTEMS)},
                      {"role": "user", "content": f"Quick question: how do I {t}?"}])
    return convs


def eval_texts(path: Path) -> set[str]:
    texts: set[str] = set()
    if not path.is_file():
        return texts
    for line in path.read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            if "prompt" in obj:
                texts.add(obj["prompt"].strip().lower())
            for m in obj.get("messages", []):
                if m["role"] == "user":
                    texts.add(m["content"].strip().lower())
    return texts


def build(seed: int = 0, eval_path: Path = HERE / "eval.jsonl") -> list[dict]:
    rng = random.Random(seed)
    held_out = eval_texts(eval_path)
    rows, seen = [], set()
    for text in single_turn(rng):
        key = text.strip().lower()
        if key in seen or key in held_out:
            continue
        seen.add(key)
        rows.append({"prompt": text})
    for msgs in multi_turn(rng):
        key = json.dumps(msgs)
        if key in seen or any(m["content"].strip().lower() in held_out
                              for m in msgs if m["role"] == "user"):
            continue
        seen.add(key)
        rows.append({"messages": msgs})
    rng.shuffle(rows)
    return [{"id": f"train-{i:05d}", **r} for i, r in enumerate(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "train.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = build(args.seed)
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    multi = sum("messages" in r for r in rows)
    print(f"wrote {len(rows)} prompts ({multi} multi-turn/system) to {args.out}")


if __name__ == "__main__":
    main()
